//! What the abuse tests share: the rig (a server on a runtime of its own, one attack at a time),
//! the canary call that runs through every attack, memory and descriptor bounds, the check of
//! the records, the report the long run collects, and connections from chosen loopback
//! addresses. Also used by `tests/abuse_logs.rs`.
//!
//! # The rig
//! The server runs on a runtime of its own (two workers) and the canary on a thread of its
//! own, so that the attacking client, on the test's runtime, can slow the canary only through
//! the server: which is what each test measures. Attacks run one at a time (a lock), so one
//! attack's figures are not another's.
//!
//! # The canary
//! A real inbound echo call from 127.0.0.1 that sends a 20 ms frame every 20 ms, from before
//! the attack until after it, each frame numbered and checked byte for byte on its way back.
//! An attack passes when the canary lost no frame and its p99 round trip stayed under 50 ms
//! (the bound issue 10 sets), the process's memory grew by less than the attack's bound, every
//! descriptor it opened was given back, and every record is ended and readable by a JSON
//! parser with serde_json's depth limit (128) afterwards.
//!
//! # Strength and report
//! `CALLGATE_ABUSE=full` runs each attack at the sizes of the issue (`bench/abuse.sh`, release
//! build); otherwise the short version runs (CI). With `CALLGATE_ABUSE_REPORT=FILE` each attack
//! appends one JSON line with its figures to FILE, written before the checks so that a failing
//! attack is reported too.
//!
//! Memory and descriptors are the test process's: the server's and the attacking client's
//! together, so each growth is an upper bound on the server's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callgate_server::Config;
use callgate_testkit::phone::WAIT;
use callgate_testkit::{TestServer, cdr, incoming_call};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{MutexGuard, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Where real callers (and the canary) connect from.
pub(crate) const CALLER: [u8; 4] = [127, 0, 0, 1];
/// Where attacks come from.
pub(crate) const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// The canary's bound on its p99 round trip (issue 10).
pub(crate) const P99_BOUND: Duration = Duration::from_millis(50);
/// The frame period of the canary (and of every phone).
pub(crate) const FRAME: Duration = Duration::from_millis(20);
/// The fewest frames the canary sends (0.5 s): it runs through the attack and at least this
/// long.
const MIN_CANARY_FRAMES: u64 = 25;
/// The canary's frame: 20 ms of PCM_8000, the inbound default.
const FRAME_BYTES: usize = 320;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// How hard the attacks hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strength {
    /// The short version, for CI under `cargo test` (debug build, a few seconds per attack).
    Ci,
    /// The sizes the issue gives (`CALLGATE_ABUSE=full`, run by `bench/abuse.sh`).
    Full,
}

impl Strength {
    pub(crate) fn get() -> Self {
        match std::env::var("CALLGATE_ABUSE").as_deref() {
            Ok("full") => Self::Full,
            _ => Self::Ci,
        }
    }

    /// `ci` in the short version, `full` in the long run.
    pub(crate) fn pick<T>(self, ci: T, full: T) -> T {
        match self {
            Self::Ci => ci,
            Self::Full => full,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ci => "ci",
            Self::Full => "full",
        }
    }
}

/// One attack at a time: every rig holds this while it runs.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's resident memory and open descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) rss: u64,
    pub(crate) fds: u64,
}

impl Usage {
    /// This process's.
    pub(crate) fn now() -> Self {
        Self {
            rss: rss(),
            fds: fds(),
        }
    }

    /// Another process's (a server the test started).
    pub(crate) fn of(pid: u32) -> Self {
        let proc = pid.to_string();
        Self {
            rss: rss_of(&proc),
            fds: fds_of(&proc),
        }
    }
}

fn rss() -> u64 {
    rss_of("self")
}

fn fds() -> u64 {
    fds_of("self")
}

fn rss_of(proc: &str) -> u64 {
    // statm: size resident shared ... in pages (4 KiB on the machines this runs on).
    std::fs::read_to_string(format!("/proc/{proc}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn fds_of(proc: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{proc}/fd")).map_or(0, |d| d.count() as u64)
}

/// Holds the lock that runs the attacks one at a time (a rig holds it while it lives).
pub(crate) async fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// Appends a line to the long run's report (`CALLGATE_ABUSE_REPORT`), and prints it. The
/// line gets the test's name (libtest names the thread a test runs on after it).
pub(crate) fn report(line: &Value) {
    let mut line = line.clone();
    line["test"] = json!(std::thread::current().name());
    eprintln!("report: {line}");
    if let Ok(path) = std::env::var("CALLGATE_ABUSE_REPORT") {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("the report file opens");
        writeln!(file, "{line}").expect("the report is written");
    }
}

/// The highest usage seen since the last reset (sampled by the canary, every frame).
#[derive(Debug, Default)]
struct Peaks {
    rss: AtomicU64,
    fds: AtomicU64,
    /// The highest RSS since [`Rig::phase`] (one part of an attack).
    phase_rss: AtomicU64,
    /// Frames the canary has had back.
    echoed: AtomicU64,
}

impl Peaks {
    fn sample(&self, fds_too: bool) {
        let rss = rss();
        self.rss.fetch_max(rss, Ordering::Relaxed);
        self.phase_rss.fetch_max(rss, Ordering::Relaxed);
        if fds_too {
            self.fds.fetch_max(fds(), Ordering::Relaxed);
        }
    }
}

/// A server on a runtime of its own, with the canary's bounds and the attack's figures.
pub(crate) struct Rig {
    pub(crate) server: TestServer,
    /// The attack's name in the report (`item 5: ...`).
    attack: String,
    strength: Strength,
    runtime: ServerRuntime,
    before: Usage,
    peaks: Arc<Peaks>,
    /// How much the process's memory may grow during the attack.
    rss_bound: u64,
    figures: std::sync::Mutex<serde_json::Map<String, Value>>,
    /// The attack's own checks that failed ([`Rig::expect`]).
    failed: std::sync::Mutex<Vec<String>>,
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// How many workers the server's runtime has (`callgate serve` has one per core; this
/// machine class has two).
pub(crate) const SERVER_WORKERS: usize = 2;

impl Rig {
    /// Starts a server with [`callgate_testkit::test_config`] changed by `tweak`.
    pub(crate) async fn start(
        attack: &str,
        tweak: impl FnOnce(&mut Config) + Send + 'static,
    ) -> Self {
        Self::start_with(attack, |runtime| {
            runtime.spawn(callgate_testkit::spawn_server(tweak))
        })
        .await
    }

    /// Starts a server whose routes may use the agents of `catalog`.
    pub(crate) async fn start_with_catalog(
        attack: &str,
        catalog: callgate_agent::Catalog,
        tweak: impl FnOnce(&mut Config) + Send + 'static,
    ) -> Self {
        Self::start_with(attack, |runtime| {
            runtime.spawn(async move {
                callgate_testkit::spawn_server_with_catalog(&catalog, tweak).await
            })
        })
        .await
    }

    async fn start_with(
        attack: &str,
        spawn: impl FnOnce(&tokio::runtime::Runtime) -> tokio::task::JoinHandle<TestServer>,
    ) -> Self {
        let guard = one_at_a_time().await;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_WORKERS)
            .thread_name("server")
            .enable_all()
            .build()
            .expect("the server's runtime");
        let server = spawn(&runtime).await.expect("the server starts");
        Self {
            server,
            attack: attack.to_owned(),
            strength: Strength::get(),
            runtime: ServerRuntime(Some(runtime)),
            before: Usage::now(),
            peaks: Arc::default(),
            rss_bound: 64 << 20,
            figures: std::sync::Mutex::default(),
            failed: std::sync::Mutex::default(),
            _one_at_a_time: guard,
        }
    }

    /// The server's runtime (to stall it).
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime
            .0
            .as_ref()
            .expect("the runtime lives as long as the rig")
            .handle()
    }

    /// How much the process's memory may grow during this attack (default 64 MiB).
    pub(crate) fn bound_rss(&mut self, bytes: u64) {
        self.rss_bound = bytes;
    }

    /// Starts a phase of the attack: [`Phase::grew`] is how much the process's memory grew
    /// during it at most (sampled every canary frame).
    pub(crate) fn phase(&self) -> Phase {
        let now = rss();
        self.peaks.phase_rss.store(now, Ordering::Relaxed);
        Phase {
            before: now,
            peaks: self.peaks.clone(),
        }
    }

    /// A figure of this attack for the report (and the test's output).
    pub(crate) fn figure(&self, name: &str, value: impl Into<Value>) {
        let value = value.into();
        eprintln!("figure: {}: {name} = {value}", self.attack);
        self.figures
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned(), value);
    }

    /// One of the attack's own checks: a failure is reported with the figures and fails the
    /// test in [`Rig::check`], so that the long run's report has the figures of a failing
    /// attack too.
    pub(crate) fn expect(&self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            eprintln!("failed: {}: {what}", self.attack);
            self.failed.lock().expect("not poisoned").push(what);
        }
    }

    /// Starts the canary; the bounds are measured from here.
    pub(crate) async fn canary(&mut self) -> Canary {
        let canary = Canary::start(
            &self.server.url("/"),
            self.server.admin_addr,
            &incoming_call("canary"),
            "canary",
            self.peaks.clone(),
        )
        .await;
        self.before = Usage::now();
        self.peaks.rss.store(self.before.rss, Ordering::Relaxed);
        self.peaks.fds.store(self.before.fds, Ordering::Relaxed);
        canary
    }

    /// Another call like the canary (an echo, numbered frames checked on their way back) that
    /// starts with `start` (an inbound `incoming_call` with this sessionId): a victim or a
    /// bystander the test judges itself.
    pub(crate) async fn call(&self, id: &str, start: &str) -> Canary {
        Canary::start(
            &self.server.url("/"),
            self.server.admin_addr,
            start,
            id,
            Arc::default(),
        )
        .await
    }

    /// Ends the canary and checks everything: the canary lost nothing and kept its p99 under
    /// [`P99_BOUND`], memory grew by less than the bound, the descriptors came back, every
    /// record is ended and the lists parse. Then shuts the server down.
    pub(crate) async fn finish(self, canary: Canary) {
        let run = self.end_canary(canary).await;
        let frames = run.frames();
        self.check(&run, frames).await;
    }

    /// Ends the canary (once it has run at least 0.5 s), checks its record, and hands back what
    /// it saw, for [`Rig::check`].
    pub(crate) async fn end_canary(&self, canary: Canary) -> CanaryRun {
        // A p99 needs frames: the canary runs at least this long, through the attack.
        let short = MIN_CANARY_FRAMES.saturating_sub(canary.echoed());
        canary.alive(short).await;
        canary.end(&self.server).await
    }

    /// The checks of [`Rig::finish`], judging the canary on the `judged` frames only (a stall
    /// test judges the frames after the stall). Then shuts the server down.
    pub(crate) async fn check(self, run: &CanaryRun, judged: Vec<FrameResult>) {
        let records = check_records(self.server.admin_addr).await;
        let after = settled_usage(self.before.fds).await;
        let peak = Usage {
            rss: self.peaks.rss.load(Ordering::Relaxed).max(after.rss),
            fds: self.peaks.fds.load(Ordering::Relaxed).max(after.fds),
        };
        let all = Stats::of(&run.frames());
        let stats = Stats::of(&judged);
        let figures = std::mem::take(&mut *self.figures.lock().expect("not poisoned"));
        let failed = std::mem::take(&mut *self.failed.lock().expect("not poisoned"));
        let line = json!({
            "attack": self.attack,
            "strength": self.strength.as_str(),
            "canary": {
                "frames": all.frames,
                "lost": all.lost,
                "p50_ms": ms(all.p50),
                "p99_ms": ms(all.p99),
                "max_ms": ms(all.max),
                "judged_frames": stats.frames,
                "judged_lost": stats.lost,
                "judged_p99_ms": ms(stats.p99),
                "problems": run.problems,
            },
            "rss": {"before": self.before.rss, "peak": peak.rss, "after": after.rss,
                "bound": self.rss_bound},
            "fds": {"before": self.before.fds, "peak": peak.fds, "after": after.fds},
            "records": match &records {
                Ok(n) => json!({"consistent": true, "count": n}),
                Err(e) => json!({"consistent": false, "problem": e}),
            },
            "figures": figures,
            "failed": failed,
        });
        report(&line);
        assert!(failed.is_empty(), "{}: {failed:?}", self.attack);
        assert!(run.problems.is_empty(), "canary: {:?}", run.problems);
        assert_eq!(stats.lost, 0, "the canary lost frames: {stats:?}");
        assert!(
            stats.frames >= MIN_CANARY_FRAMES as usize / 2,
            "too few canary frames judged: {stats:?}"
        );
        assert!(
            stats.p99 < P99_BOUND,
            "canary p99 {:?} (bound {P99_BOUND:?}): {stats:?}",
            stats.p99
        );
        let grew = peak.rss.saturating_sub(self.before.rss);
        assert!(
            grew < self.rss_bound,
            "memory grew by {} MiB (bound {} MiB)",
            grew >> 20,
            self.rss_bound >> 20
        );
        assert!(
            after.fds <= self.before.fds,
            "descriptors not given back: {} before, {} after",
            self.before.fds,
            after.fds
        );
        if let Err(e) = records {
            panic!("records: {e}");
        }
        self.server.shutdown().await;
    }
}

/// A part of an attack whose memory growth is measured.
pub(crate) struct Phase {
    before: u64,
    peaks: Arc<Peaks>,
}

impl Phase {
    /// How much the process's resident memory grew at most since the phase began, bytes.
    pub(crate) fn grew(&self) -> u64 {
        let peak = self.peaks.phase_rss.load(Ordering::Relaxed).max(rss());
        peak.saturating_sub(self.before)
    }
}

/// Mebibytes, for the report.
pub(crate) fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0
}

/// Milliseconds, for the report.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The server's runtime, shut down without blocking when dropped (dropping a runtime waits
/// for its workers, which a test's runtime must not do).
struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What became of one canary frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameResult {
    /// When it was sent.
    pub(crate) sent: Instant,
    /// Its round trip, if it came back.
    pub(crate) rtt: Option<Duration>,
}

/// Round trips of some canary frames.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stats {
    pub(crate) frames: usize,
    pub(crate) lost: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl Stats {
    pub(crate) fn of(frames: &[FrameResult]) -> Self {
        let mut rtts: Vec<Duration> = frames.iter().filter_map(|f| f.rtt).collect();
        rtts.sort();
        // Nearest rank.
        let rank = |q: f64| {
            let i = ((q * rtts.len() as f64).ceil() as usize).max(1) - 1;
            rtts.get(i).copied().unwrap_or_default()
        };
        Self {
            frames: frames.len(),
            lost: frames.len() - rtts.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: rtts.last().copied().unwrap_or_default(),
        }
    }
}

/// What the canary saw, once it has hung up.
#[derive(Debug)]
pub(crate) struct CanaryRun {
    results: Vec<FrameResult>,
    /// Anything wrong besides lateness: a frame changed, out of order, a message it did not
    /// expect, a connection lost.
    pub(crate) problems: Vec<String>,
}

impl CanaryRun {
    /// Every frame.
    pub(crate) fn frames(&self) -> Vec<FrameResult> {
        self.results.clone()
    }
}

/// A real echo call that runs on a thread of its own through the whole attack: a numbered
/// 20 ms frame every 20 ms, each checked byte for byte on its way back.
pub(crate) struct Canary {
    /// Its record's id.
    id: String,
    stop: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<CanaryRun>,
    peaks: Arc<Peaks>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The canary's frame number `seq`: the number, then a pattern it determines.
fn canary_frame(seq: u64) -> Vec<u8> {
    let mut frame = vec![(seq % 251) as u8 + 1; FRAME_BYTES];
    frame[..8].copy_from_slice(&seq.to_le_bytes());
    frame
}

impl Canary {
    /// Places a canary call on any server (one the test started as a process): its first
    /// message `start`, its record's external ID `id`.
    pub(crate) async fn place(url: &str, admin: SocketAddr, start: &str, id: &str) -> Self {
        Self::start(url, admin, start, id, Arc::default()).await
    }

    /// Places the call (its first message `start`, its record's external ID `id`) and starts
    /// sending once it is answered.
    async fn start(url: &str, admin: SocketAddr, start: &str, id: &str, peaks: Arc<Peaks>) -> Self {
        let url = url.to_owned();
        let first = start.to_owned();
        let (answered_tx, answered) = oneshot::channel();
        let (stop, stopped) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let call_id = id.to_owned();
        let thread_peaks = peaks.clone();
        let thread = std::thread::Builder::new()
            .name("canary".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the canary's runtime");
                let run = runtime.block_on(canary_call(
                    url,
                    first,
                    call_id,
                    answered_tx,
                    stopped,
                    thread_peaks,
                ));
                let _ = done_tx.send(run);
            })
            .expect("the canary's thread");
        let answered = tokio::time::timeout(WAIT, answered)
            .await
            .expect("the canary is answered in time");
        answered
            .expect("the canary's thread runs")
            .expect("the canary is answered");
        Self {
            id: record_id(admin, id).await,
            stop: Some(stop),
            done,
            peaks,
            thread: Some(thread),
        }
    }

    /// Frames echoed so far.
    pub(crate) fn echoed(&self) -> u64 {
        self.peaks.echoed.load(Ordering::Relaxed)
    }

    /// Waits until the canary has had `n` more frames back: it is alive now.
    pub(crate) async fn alive(&self, n: u64) {
        let target = self.echoed() + n;
        // The frames take their own time (20 ms each), then the usual patience.
        let deadline = Instant::now() + FRAME * n as u32 + WAIT;
        while self.echoed() < target {
            assert!(Instant::now() < deadline, "the canary stopped echoing");
            tokio::time::sleep(FRAME).await;
        }
    }

    /// Stops sending, waits for the frames in flight, hangs up; checks its record (ended by
    /// the hangup, every frame counted in and every frame that came back counted out).
    pub(crate) async fn end(self, server: &TestServer) -> CanaryRun {
        self.end_on(server.admin_addr).await
    }

    /// [`Canary::end`] on any server, by its admin API's address.
    pub(crate) async fn end_on(mut self, admin: SocketAddr) -> CanaryRun {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let run = tokio::time::timeout(WAIT * 2, &mut self.done)
            .await
            .expect("the canary hangs up in time")
            .expect("the canary's thread ends with its figures");
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the canary's thread");
        }
        let stats = Stats::of(&run.results);
        eprintln!("canary: {stats:?}");
        let record = ended_record(admin, &self.id).await;
        assert_eq!(record["end_reason"], "peer_hangup", "{record}");
        assert_eq!(record["frames_in"], run.results.len(), "{record}");
        assert_eq!(
            record["frames_out"],
            run.results.iter().filter(|f| f.rtt.is_some()).count(),
            "{record}"
        );
        run
    }
}

/// The canary's call, on its own thread.
async fn canary_call(
    url: String,
    start: String,
    id: String,
    answered: oneshot::Sender<Result<(), String>>,
    mut stop: oneshot::Receiver<()>,
    peaks: Arc<Peaks>,
) -> CanaryRun {
    let mut run = CanaryRun {
        results: Vec::new(),
        problems: Vec::new(),
    };
    let setup = async {
        // Without TCP_NODELAY a frame written right after a pong waits for the pong's
        // (delayed) ACK: up to 40 ms of the phone's own making.
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        ws.send(Message::Text(start.into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains("answer") => return Ok(ws),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => return Err(format!("not answered: {other:?}")),
            }
        }
    };
    let mut ws = match setup.await {
        Ok(ws) => {
            let _ = answered.send(Ok(()));
            ws
        }
        Err(e) => {
            let _ = answered.send(Err(e.clone()));
            run.problems.push(e);
            return run;
        }
    };
    let mut tick = tokio::time::interval(FRAME);
    let mut next_back = 0u64;
    let mut lost_connection = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let seq = run.results.len() as u64;
                run.results.push(FrameResult { sent: Instant::now(), rtt: None });
                if let Err(e) = ws.send(Message::Binary(canary_frame(seq).into())).await {
                    run.problems.push(format!("send: {e}"));
                    lost_connection = true;
                    break;
                }
                peaks.sample(seq.is_multiple_of(5));
            }
            message = ws.next() => {
                if !take(message, &mut run, &mut next_back, &peaks) {
                    lost_connection = true;
                    break;
                }
            }
        }
    }
    if lost_connection {
        return run;
    }
    // The frames in flight.
    let sent = run.results.len() as u64;
    let _ = tokio::time::timeout(WAIT, async {
        while next_back < sent {
            let message = ws.next().await;
            if !take(message, &mut run, &mut next_back, &peaks) {
                break;
            }
        }
    })
    .await;
    let bye = async {
        ws.send(Message::Text(r#"{"event":"hangup"}"#.into()))
            .await?;
        ws.send(Message::Text(cdr(&id).into())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Ok(u16::from(f.code)),
                Some(Ok(Message::Close(None))) | None => return Ok(1005),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(WAIT, bye).await {
        Ok(Ok(1000)) => {}
        other => run.problems.push(format!("hangup: {other:?}")),
    }
    run
}

/// Takes one message from the server into the canary's run; false when the connection is
/// gone.
fn take(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    run: &mut CanaryRun,
    next_back: &mut u64,
    peaks: &Peaks,
) -> bool {
    let now = Instant::now();
    match message {
        Some(Ok(Message::Binary(data))) => {
            let seq = data
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes);
            match seq {
                Some(seq)
                    if seq >= *next_back
                        && (seq as usize) < run.results.len()
                        && data[..] == canary_frame(seq)[..] =>
                {
                    let result = &mut run.results[seq as usize];
                    result.rtt = Some(now - result.sent);
                    *next_back = seq + 1;
                    peaks.echoed.fetch_add(1, Ordering::Relaxed);
                }
                _ => run.problems.push(format!(
                    "a frame that is not the next one sent back unchanged ({} bytes, \
                     expected frame {next_back} or later)",
                    data.len()
                )),
            }
            true
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => true,
        Some(Ok(other)) => {
            let closed = matches!(other, Message::Close(_));
            run.problems
                .push(format!("unexpected message: {:.200}", format!("{other:?}")));
            !closed
        }
        Some(Err(e)) => {
            run.problems.push(format!("connection lost: {e}"));
            false
        }
        None => {
            run.problems.push("connection closed".into());
            false
        }
    }
}

/// Every record ended, every page of the list readable by serde_json with its default depth
/// limit (128): `Ok(number of records)` or what is wrong.
pub(crate) async fn check_records(admin: SocketAddr) -> Result<usize, String> {
    /// What is checked of each record: the rest of it is parsed (and depth-checked) and
    /// skipped, so that pages of large records cost the client little.
    #[derive(serde::Deserialize)]
    struct Light {
        external_id: String,
        ended_at: Option<String>,
        end_reason: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Page {
        calls: Vec<Light>,
        next: Option<String>,
    }
    let began = Instant::now();
    loop {
        let mut records = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let path = match &before {
                Some(id) => format!("/api/calls?limit=1000&before={id}"),
                None => "/api/calls?limit=1000".to_owned(),
            };
            let response = admin_get(admin, &path).await;
            if response.status != 200 {
                return Err(format!("GET {path}: {}", response.status));
            }
            let page: Page = serde_json::from_slice(&response.body)
                .map_err(|e| format!("GET {path} does not parse: {e}"))?;
            records.extend(page.calls);
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        let open: Vec<&Light> = records
            .iter()
            .filter(|r| r.ended_at.is_none() || r.end_reason.is_none())
            .collect();
        if open.is_empty() {
            return Ok(records.len());
        }
        if began.elapsed() > WAIT {
            return Err(format!(
                "{} records not ended, e.g. {:.100}",
                open.len(),
                open[0].external_id
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the newest call with this external ID, found in pages of 20 (cheap while the
/// newest records are small), waiting for it to exist.
pub(crate) async fn record_id(admin: SocketAddr, external_id: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Light {
        id: String,
        external_id: String,
    }
    #[derive(serde::Deserialize)]
    struct Page {
        calls: Vec<Light>,
        next: Option<String>,
    }
    let began = Instant::now();
    loop {
        let mut before: Option<String> = None;
        loop {
            let path = match &before {
                Some(id) => format!("/api/calls?limit=20&before={id}"),
                None => "/api/calls?limit=20".to_owned(),
            };
            let page: Page = serde_json::from_slice(&admin_get(admin, &path).await.body)
                .expect("a page of the list");
            if let Some(found) = page.calls.iter().find(|c| c.external_id == external_id) {
                return found.id.clone();
            }
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        assert!(began.elapsed() < WAIT, "no call {external_id}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The record of call `id` once it has ended.
pub(crate) async fn ended_record(admin: SocketAddr, id: &str) -> Value {
    let began = Instant::now();
    loop {
        let record = admin_get(admin, &format!("/api/calls/{id}"))
            .await
            .json()
            .expect("a record");
        if !record["ended_at"].is_null() {
            return record;
        }
        assert!(began.elapsed() < WAIT, "call {id} did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Usage once the descriptors have come back to `fds` (closing connections linger up to 2 s),
/// or after [`WAIT`].
async fn settled_usage(fds: u64) -> Usage {
    let began = Instant::now();
    loop {
        let now = Usage::now();
        if now.fds <= fds || began.elapsed() > WAIT {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads one counter (or gauge) from the metrics text.
pub(crate) fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

/// A TCP connection to the call listener from this loopback address.
pub(crate) async fn connect_from(server: &TestServer, ip: [u8; 4]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(server.call_addr).await
}

/// A WebSocket to `path` from this loopback address, or why there is none.
pub(crate) async fn ws_from(server: &TestServer, ip: [u8; 4], path: &str) -> Result<Ws, String> {
    let stream = connect_from(server, ip)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(server.url(path), stream),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("upgrade: {e}")),
        Err(_) => Err("upgrade: no answer".into()),
    }
}

/// The close a WebSocket gets: code and reason (1006: none).
pub(crate) async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (f.code.into(), f.reason.to_string()),
            Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return (1006, String::new()),
            Err(_) => panic!("no close within {WAIT:?}"),
        }
    }
}

/// Places a call from `ip`: `Ok` once answered, else what happened instead.
pub(crate) async fn place_call(server: &TestServer, ip: [u8; 4], id: &str) -> Result<Ws, String> {
    let mut ws = ws_from(server, ip, "/").await?;
    ws.send(Message::Text(incoming_call(id).into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        return match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) if t.contains("answer") => Ok(ws),
            Ok(Some(Ok(Message::Close(f)))) => Err(format!("closed: {f:?}")),
            other => Err(format!("no answer: {other:?}")),
        };
    }
}

/// Hangs up an inbound call placed with [`place_call`]: hangup, CDR, the server's close.
pub(crate) async fn hang_up(ws: &mut Ws, id: &str) -> (u16, String) {
    ws.send(Message::Text(r#"{"event":"hangup"}"#.into()))
        .await
        .expect("hangup sent");
    ws.send(Message::Text(cdr(id).into()))
        .await
        .expect("CDR sent");
    close_of(ws).await
}

/// An HTTP response from the admin API, as raw as it came.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    /// The head's lines after the status line, lowercased.
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON (serde_json's default depth limit, 128).
    pub(crate) fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "{} {:?}: {e}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            )
        })
    }

    /// Whether the response says its body is JSON.
    pub(crate) fn is_json(&self) -> bool {
        self.head.contains("content-type: application/json")
    }
}

/// Sends `head` (a whole request head, `Connection: close`) and `body` to the admin API and
/// reads the response (one copy of the body, so that large replies cost the client little).
pub(crate) async fn admin_request(admin: SocketAddr, head: &str, body: &[u8]) -> Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(admin)
        .await
        .expect("connect to admin API");
    // The server may answer and close before reading a refused body.
    if stream.write_all(head.as_bytes()).await.is_ok() {
        for chunk in body.chunks(64 * 1024) {
            if stream.write_all(chunk).await.is_err() {
                break;
            }
        }
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    raw.drain(..end + 4);
    Response {
        status,
        head,
        body: raw,
    }
}

/// `GET path` on the admin API.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> Response {
    admin_request(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\r\n"),
        &[],
    )
    .await
}

/// `POST path` with this body on the admin API.
pub(crate) async fn admin_post(admin: SocketAddr, path: &str, body: &[u8]) -> Response {
    admin_request(
        admin,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
    )
    .await
}

/// The bytes of every file under `dir`.
pub(crate) fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Every entry of a call's event log, page by page; checks the pages are bounded and
/// parse with serde_json's default depth limit.
pub(crate) async fn all_events(admin: SocketAddr, id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0u64;
    loop {
        let page = admin_get(admin, &format!("/api/calls/{id}/events?after={after}")).await;
        assert_eq!(page.status, 200);
        let page = page.json().expect("an events page parses");
        let entries = page["events"].as_array().cloned().unwrap_or_default();
        assert!(entries.len() <= 1000, "a page of {}", entries.len());
        events.extend(entries);
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => return events,
        }
    }
}
