//! What the agent wiring costs per echoed frame, measured the way the call task uses it: for
//! each frame, the turn's first look (the agent's future and the command channel, both
//! pending), `Commands::busy`, the caller's audio pushed, the echo agent polled once, its
//! command taken, and the channel found empty. Many calls take turns, as on a busy server.
//!
//! A benchmark, so ignored by default:
//! `cargo test --release -p callgate-agent --test echo_cost -- --ignored --nocapture`
//! (`ECHO_COST_FRAMES`, `ECHO_COST_CALLS` set the size). It fails if a frame is not echoed
//! or if any of the turn's steps woke the call's task (none should: it polls its agent
//! itself).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Wake, Waker};
use std::time::Instant;

use bytes::Bytes;
use callgate_agent::echo::EchoFactory;
use callgate_agent::{AgentCommand, AgentFactory, CallInfo, PhoneInfo, Spawner, wire};
use callgate_proto::{AudioFormat, Protocol};

struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn info() -> CallInfo {
    CallInfo {
        call_id: "c".into(),
        protocol: Protocol::Inbound,
        caller: "1".into(),
        callee: "2".into(),
        external_id: "e".into(),
        phone: PhoneInfo::Inbound {
            caller_id: "1".into(),
            did_number: "2".into(),
            session_id: "e".into(),
        },
        route: "default".into(),
        agent: "echo".into(),
        input_format: AudioFormat::Pcm8000,
        output_format: AudioFormat::Pcm8000,
    }
}

/// This thread's time on a CPU, ns (Linux's schedstat): on a shared machine the wall clock
/// also counts the time other processes ran.
fn cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "a benchmark: run it in release with --ignored --nocapture"]
fn echo_turn_cost() {
    let frames = env("ECHO_COST_FRAMES", 4_000_000);
    let calls = env("ECHO_COST_CALLS", 500).max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _entered = runtime.enter();
    let started = tokio::time::Instant::now();
    let task = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(task.clone());
    let mut cx = Context::from_waker(&waker);
    let mut wired: Vec<_> = (0..calls)
        .map(|_| {
            let (io, mut side) = wire(info(), 50, Spawner::detached(), started);
            side.events.polled_by(waker.clone());
            let agent = EchoFactory.start(io);
            (side, agent)
        })
        .collect();
    // The agent answers first.
    for (side, agent) in &mut wired {
        assert!(agent.as_mut().poll(&mut cx).is_pending());
        let answer = side.commands.try_recv().map(|s| s.command);
        assert_eq!(answer, Some(AgentCommand::Answer));
    }
    let frame = Bytes::from(vec![0u8; 320]);
    let mut echoed = 0usize;
    let cpu0 = cpu_ns();
    let t0 = Instant::now();
    for n in 0..frames {
        let (side, agent) = &mut wired[n % calls];
        // The select's look at the start of the turn.
        assert!(agent.as_mut().poll(&mut cx).is_pending());
        assert!(side.commands.poll_recv(&mut cx).is_pending());
        side.commands.busy();
        // The caller's frame, then the agent, then its commands.
        side.events.push_audio(frame.clone());
        assert!(agent.as_mut().poll(&mut cx).is_pending());
        while let Some(stamped) = side.commands.try_recv() {
            if let AgentCommand::Audio(data) = stamped.command {
                assert_eq!(data.len(), frame.len());
                echoed += 1;
            }
        }
    }
    let elapsed = t0.elapsed();
    let cpu = cpu0.zip(cpu_ns()).map(|(a, b)| b.saturating_sub(a));
    assert_eq!(echoed, frames, "every frame came back");
    assert_eq!(
        task.0.load(Ordering::Relaxed),
        0,
        "the call's task polls its agent itself: nothing should wake it"
    );
    let per_frame = |ns: f64| ns / frames as f64;
    println!(
        "echo turn: {:.1} ns of CPU, {:.1} ns of wall clock per frame ({frames} frames over \
         {calls} calls)",
        cpu.map_or(f64::NAN, |ns| per_frame(ns as f64)),
        per_frame(elapsed.as_nanos() as f64),
    );
}
