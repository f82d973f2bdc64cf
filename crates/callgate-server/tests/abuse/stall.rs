//! Item 5: a stall. A call task held up (by its own agent, or with every other call when the
//! whole runtime is) must come back to real time at once, by the stated policy (what is more
//! than 100 ms late is dropped, the rest goes out back to back), and the stall is counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callgate_agent::{AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Catalog};
use callgate_server::routes::parse_spec;
use serde_json::json;

use super::support::*;

/// How long each stall lasts: well over the 100 ms the playout catches up by.
const STALL: Duration = Duration::from_millis(300);

/// The stalls' counters: (stalls, audio they dropped in ms; a sum of seconds as floats, so
/// round it).
async fn stall_metrics(rig: &Rig) -> (f64, f64) {
    let text = rig.server.metrics_text().await;
    (
        metric(&text, "callgate_playout_stalls_total ").unwrap_or(0.0),
        metric(&text, "callgate_playout_stall_dropped_seconds_total ").unwrap_or(0.0) * 1e3,
    )
}

/// An echo agent that blocks its call's task for [`STALL`] every `every` frames, `times`
/// times, as an agent making a synchronous read would (it is polled by the call task). Each
/// stall's end goes to `ends`.
struct Stalling {
    every: u64,
    times: usize,
    ends: Arc<Mutex<Vec<Instant>>>,
}

impl AgentFactory for Stalling {
    fn name(&self) -> &str {
        "stalling"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        let (every, times, ends) = (self.every, self.times, self.ends.clone());
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            let mut frames = 0;
            while let Some(event) = io.recv().await {
                let data = match event {
                    AgentEvent::Audio(data) => data,
                    AgentEvent::Ended(_) => break,
                    _ => continue,
                };
                frames += 1;
                if frames % every == 0 && ends.lock().expect("not poisoned").len() < times {
                    #[allow(
                        clippy::disallowed_methods,
                        reason = "the attack: an agent that blocks its call's task"
                    )]
                    std::thread::sleep(STALL);
                    ends.lock().expect("not poisoned").push(Instant::now());
                }
                io.send(AgentCommand::Audio(data)).await?;
            }
            Ok(())
        })
    }
}

/// The frames sent outside the stalls (a frame sent during one, or in the frame after it,
/// waited in the socket).
fn outside(frames: &[FrameResult], ends: &[Instant]) -> Vec<FrameResult> {
    frames
        .iter()
        .filter(|f| {
            !ends
                .iter()
                .any(|&end| f.sent + STALL + FRAME > end && f.sent < end + FRAME)
        })
        .copied()
        .collect()
}

/// Item 5: an echo call that stalled once (the issue: behind a slow admin read) stayed
/// 150-420 ms behind for the rest of the call, because its playout re-anchored. Here one
/// call's agent blocks its task for 300 ms, a few times: that call drops what is more than
/// 100 ms late and is on real time again from the next frame, and each stall is counted.
/// The canary shares the server's two workers: a task that blocks its worker can hold up
/// whatever tokio queued behind it there (its LIFO slot is not stolen), which is why agents
/// must never block. So the canary too is judged outside the stalls, and whatever it lost
/// must be what the stall policy dropped.
#[tokio::test]
async fn a_call_task_that_stalls_is_back_on_real_time_at_once() {
    let times = Strength::get().pick(1, 5);
    let ends = Arc::new(Mutex::new(Vec::new()));
    let mut catalog = Catalog::builtin();
    let agent = Arc::new(Stalling {
        every: 50,
        times,
        ends: ends.clone(),
    });
    catalog.register("stalling", move |_| {
        Ok(agent.clone() as Arc<dyn AgentFactory>)
    });
    let mut rig = Rig::start_with_catalog("item 5: a call task stalls", catalog, |c| {
        c.routes = [
            json!({"name": "stalling", "agent": "stalling", "match": {"callee": "0299"}}),
            json!({"name": "default", "agent": "echo"}),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, spec)| parse_spec(spec, i).expect("a valid route"))
        .collect();
    })
    .await;
    let canary = rig.canary().await;
    let start = json!({"event": "incoming_call", "callerId": "01099998888",
        "didNumber": "0299", "sessionId": "stalled"});
    let victim = rig.call("stalled", &start.to_string()).await;
    // 50 frames between stalls, and a second after the last.
    while ends.lock().unwrap().len() < times {
        victim.alive(10).await;
    }
    victim.alive(50).await;
    let victim = victim.end(&rig.server).await;
    let run = rig.end_canary(canary).await;
    let ends = ends.lock().unwrap().clone();
    let victim_all = Stats::of(&victim.frames());
    let victim_after = Stats::of(&outside(&victim.frames(), &ends));
    let canary_all = Stats::of(&run.frames());
    let (stalls, dropped_ms) = stall_metrics(&rig).await;
    rig.figure("stalls", times);
    rig.figure("stalled call: frames lost", victim_all.lost);
    rig.figure("stalled call: slowest (ms)", ms(victim_all.max));
    rig.figure(
        "stalled call: p99 outside the stalls (ms)",
        ms(victim_after.p99),
    );
    rig.figure("canary: frames lost", canary_all.lost);
    rig.figure("callgate_playout_stalls_total", stalls);
    rig.figure("dropped by the stall policy (ms)", dropped_ms);
    rig.expect(
        victim.problems.is_empty(),
        format!("the stalled call: {:?}", victim.problems),
    );
    // Every stall counted (the canary's too, if it was held up with the stalled call).
    rig.expect(stalls >= times as f64, format!("{stalls} stalls counted"));
    // What was lost is what the policy dropped (more than 100 ms late): the rest came back.
    rig.expect(
        (victim_all.lost + canary_all.lost) as f64 * 20.0 == dropped_ms.round(),
        format!(
            "lost {} + {} frames, the policy dropped {dropped_ms} ms",
            victim_all.lost, canary_all.lost
        ),
    );
    rig.expect(
        (8 * times..=13 * times).contains(&victim_all.lost),
        format!("the stalled call lost {} frames", victim_all.lost),
    );
    // Back on real time: outside the stalls, nothing lost and nothing late.
    rig.expect(
        victim_after.lost == 0 && victim_after.p99 < P99_BOUND,
        format!("outside the stalls: {victim_after:?}"),
    );
    let judged = outside(&run.frames(), &ends);
    rig.check(&run, judged).await;
}

/// Blocks every worker of the server's runtime for [`STALL`] at once, as a slow synchronous
/// read on the async workers did (issue 10, item 6): every call stalls. Returns when the
/// stall ended.
async fn stall_server(rig: &Rig) -> Instant {
    let barrier = Arc::new(std::sync::Barrier::new(SERVER_WORKERS + 1));
    let mut blocked = Vec::new();
    for _ in 0..SERVER_WORKERS {
        let barrier = barrier.clone();
        blocked.push(rig.runtime().spawn(async move {
            barrier.wait();
            #[allow(
                clippy::disallowed_methods,
                reason = "the attack: a runtime worker blocked, as a synchronous read blocks it"
            )]
            std::thread::sleep(STALL);
        }));
    }
    // Every worker is blocked once all have reached the barrier.
    let began = std::thread::spawn(move || {
        barrier.wait();
        Instant::now()
    });
    for b in blocked {
        b.await.expect("the blocking task");
    }
    began.join().expect("the barrier") + STALL
}

/// Item 5, the case: the whole server stalls (every worker blocked for 300 ms) with
/// the canary, an echo call, live. The canary itself stalls; what it sent during the stall
/// that is more than 100 ms late is dropped, and from the next frame on it is on real time
/// again (before the fix: 273 ms late for the rest of the call).
#[tokio::test]
async fn a_stalled_server_is_back_on_real_time_at_once() {
    let times = Strength::get().pick(1, 5);
    let mut rig = Rig::start("item 5: the whole server stalls", |_| {}).await;
    let canary = rig.canary().await;
    let mut ends = Vec::new();
    for _ in 0..times {
        canary.alive(50).await;
        ends.push(stall_server(&rig).await);
    }
    canary.alive(50).await;
    let run = rig.end_canary(canary).await;
    let (stalls, dropped_ms) = stall_metrics(&rig).await;
    let all = Stats::of(&run.frames());
    let after = outside(&run.frames(), &ends);
    rig.figure("stalls", times);
    rig.figure("canary: frames lost", all.lost);
    rig.figure("canary: slowest (ms)", ms(all.max));
    rig.figure("callgate_playout_stalls_total", stalls);
    rig.figure("dropped by the stall policy (ms)", dropped_ms);
    rig.expect(stalls == times as f64, format!("{stalls} stalls counted"));
    rig.expect(
        all.lost as f64 * 20.0 == dropped_ms.round(),
        format!(
            "lost {} frames, the policy dropped {dropped_ms} ms",
            all.lost
        ),
    );
    rig.expect(
        (8 * times..=13 * times).contains(&all.lost),
        format!("lost {} frames", all.lost),
    );
    rig.check(&run, after).await;
}
