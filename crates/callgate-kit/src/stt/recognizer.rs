//! vosk in process: streaming recognition off the call's task.
//!
//! - **One model per directory, loaded once**: [`Shared::load`] keeps every loaded model in a
//!   process-wide table by canonical directory, so all routes, flows and calls that name the
//!   same directory share it (the small Korean model is ~0.5 GB resident).
//! - **A bounded pool of worker threads** (one per core, started at the first load) does all
//!   recognition: ~0.26 CPU per live 8 kHz stream measured here, far too much for the call's
//!   task. An utterance's audio waits in its own backlog; a stream with audio waiting is queued
//!   once (never twice), so the queue holds at most one entry per live utterance, and the calls
//!   admitted bound it. Workers take streams in turn and feed each what it has
//!   (round-robin: a stream with more audio goes to the back of the queue).
//! - **Policy when the pool falls behind**: an utterance that is pushed more audio while
//!   more than [`MAX_BACKLOG`] of earlier audio still waits is dropped (its audio discarded, its recogniser freed) and `finish` answers
//!   [`SttError::Overloaded`]; the others go on. A caller waiting seconds for a menu to react
//!   is worse than a "sorry?" and the retry the flow or pipeline already has.
//! - A stream dropped before `finish` (the call hung up) discards its backlog at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ::vosk::{CompleteResult, DecodingState, LogLevel, Model, Recognizer};
use tokio::sync::oneshot;

use super::SttError;

/// The most audio an utterance may have waiting for a worker before it is dropped.
pub(crate) const MAX_BACKLOG: Duration = Duration::from_secs(3);

/// Audio fed to the recogniser at once, milliseconds (small enough to round-robin fairly).
const SLICE_MS: u32 = 200;

/// A loaded model, shared.
#[derive(Clone)]
pub(crate) struct Shared {
    model: Arc<Model>,
    dir: PathBuf,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoskModel").field("dir", &self.dir).finish()
    }
}

fn models() -> MutexGuard<'static, HashMap<PathBuf, Arc<Model>>> {
    static MODELS: OnceLock<Mutex<HashMap<PathBuf, Arc<Model>>>> = OnceLock::new();
    MODELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// The model in `dir`, loaded now unless it was already (seconds: call it at load).
    pub(crate) fn load(dir: &Path) -> Result<Self, SttError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| SttError::Config(format!("stt.model: {}: {e}", dir.display())))?;
        let mut models = models();
        if let Some(model) = models.get(&dir) {
            return Ok(Self {
                model: model.clone(),
                dir,
            });
        }
        ::vosk::set_log_level(LogLevel::Error);
        let path = dir.to_str().ok_or_else(|| {
            SttError::Config(format!("stt.model: {} is not UTF-8", dir.display()))
        })?;
        let started = std::time::Instant::now();
        let model = Model::new(path).ok_or_else(|| {
            SttError::Config(format!(
                "stt.model: vosk cannot load the model in {}",
                dir.display()
            ))
        })?;
        tracing::info!(dir = %dir.display(), load_ms = started.elapsed().as_millis() as u64,
            "vosk model loaded.");
        let model = Arc::new(model);
        models.insert(dir.clone(), model.clone());
        pool();
        Ok(Self { model, dir })
    }

    /// A new recognition stream at `rate` Hz.
    pub(crate) fn stream(&self, rate: u32) -> Result<Stream, SttError> {
        #[allow(clippy::cast_precision_loss)] // call rates (8000..48000) are exact in f32
        let recognizer = Recognizer::new(&self.model, rate as f32)
            .ok_or_else(|| SttError::Engine(format!("cannot start a recogniser at {rate} Hz")))?;
        Ok(Stream {
            state: Arc::new(Mutex::new(State {
                recognizer: Some(recognizer),
                _model: self.model.clone(),
                pending: Vec::new(),
                queued: false,
                busy: false,
                texts: Vec::new(),
                done: None,
                failed: None,
                abandoned: false,
                slice: (SLICE_MS * rate / 1000).max(1) as usize,
            })),
            max_backlog: (MAX_BACKLOG.as_millis() as usize) * rate as usize / 1000,
        })
    }
}

/// What a stream and the worker feeding it share.
struct State {
    /// The recogniser, out of the lock while a worker feeds it (`busy`).
    recognizer: Option<Recognizer>,
    /// Keeps the model alive as long as the recogniser.
    _model: Arc<Model>,
    /// Audio not yet fed.
    pending: Vec<i16>,
    /// In the pool's queue.
    queued: bool,
    /// A worker holds the recogniser.
    busy: bool,
    /// Segments vosk finalised at its own endpoints.
    texts: Vec<String>,
    /// Set by `finish`: where the text goes once everything is fed.
    done: Option<oneshot::Sender<Result<String, SttError>>>,
    /// Why the stream stopped (overload, engine error).
    failed: Option<SttError>,
    /// The stream was dropped: discard everything.
    abandoned: bool,
    /// Samples fed at once.
    slice: usize,
}

type Job = Arc<Mutex<State>>;

fn lock(state: &Job) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The workers' queue.
struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        for i in 0..workers {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vosk-{i}"))
                .spawn(move || work(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start a vosk worker thread.");
            }
        }
        Pool { tx: Mutex::new(tx) }
    })
}

/// Puts `job` in the queue (the caller holds its lock and has set `queued`).
fn enqueue(job: &Job) {
    let tx = pool()
        .tx
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The receivers live as long as the process (the workers never return).
    let _ = tx.send(job.clone());
}

fn work(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        feed(&job);
    }
}

fn text_of(result: CompleteResult<'_>) -> String {
    result
        .single()
        .map(|r| r.text.trim().to_owned())
        .unwrap_or_default()
}

/// Feeds one slice of `job`'s backlog; finishes it when asked and all is fed; queues it again
/// if there is more.
fn feed(job: &Job) {
    let (mut recognizer, slice, finishing) = {
        let mut s = lock(job);
        s.queued = false;
        if s.abandoned || s.failed.is_some() {
            s.pending.clear();
            s.recognizer = None;
            // `finish` waits for this one answer (the stream is over once it has it).
            if let Some(done) = s.done.take()
                && let Some(e) = s.failed.take()
            {
                let _ = done.send(Err(e));
            }
            return;
        }
        let Some(recognizer) = s.recognizer.take() else {
            return;
        };
        let take = s.pending.len().min(s.slice);
        let slice: Vec<i16> = s.pending.drain(..take).collect();
        s.busy = true;
        (recognizer, slice, s.done.is_some() && s.pending.is_empty())
    };
    let mut texts = Vec::new();
    let mut error = None;
    if !slice.is_empty() {
        match recognizer.accept_waveform(&slice) {
            Ok(DecodingState::Finalized) => texts.push(text_of(recognizer.result())),
            Ok(_) => {}
            Err(e) => error = Some(SttError::Engine(e.to_string())),
        }
    }
    let last = finishing.then(|| text_of(recognizer.final_result()));
    let mut s = lock(job);
    s.busy = false;
    s.texts.extend(texts.into_iter().filter(|t| !t.is_empty()));
    if let Some(e) = error {
        s.failed = Some(e);
    }
    if let Some(last) = last {
        if let Some(done) = s.done.take() {
            let mut texts = std::mem::take(&mut s.texts);
            texts.push(last);
            texts.retain(|t| !t.is_empty());
            let _ = done.send(Ok(texts.join(" ")));
        }
        return;
    }
    if s.abandoned {
        return;
    }
    s.recognizer = Some(recognizer);
    if !s.pending.is_empty() || s.done.is_some() || s.failed.is_some() {
        s.queued = true;
        enqueue(job);
    }
}

/// One utterance being recognised.
pub(crate) struct Stream {
    state: Job,
    max_backlog: usize,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoskStream").finish_non_exhaustive()
    }
}

impl Stream {
    /// Adds audio to the backlog and queues the stream for a worker.
    pub(crate) fn push(&mut self, samples: &[i16]) {
        let mut s = lock(&self.state);
        if s.failed.is_some() {
            return;
        }
        // Behind: audio still waits from earlier pushes beyond the bound (one large push,
        // a whole turn handed over at once, is not being behind).
        let behind = s.pending.len() > self.max_backlog;
        s.pending.extend_from_slice(samples);
        if behind {
            tracing::warn!(
                backlog_ms = MAX_BACKLOG.as_millis() as u64,
                "vosk is behind the call's audio: the utterance is dropped."
            );
            s.pending = Vec::new();
            s.failed = Some(SttError::Overloaded);
        }
        self.schedule(&mut s);
    }

    fn schedule(&self, s: &mut State) {
        if !s.queued && !s.busy {
            s.queued = true;
            enqueue(&self.state);
        }
    }

    /// The text once every pushed sample is recognised.
    pub(crate) async fn finish(self) -> Result<String, SttError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = lock(&self.state);
            s.done = Some(tx);
            self.schedule(&mut s);
        }
        rx.await
            .map_err(|_| SttError::Engine("the recogniser stopped".into()))?
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // After `finish` answered this changes nothing; before (the call hung up, or the
        // wait was cancelled), the backlog and the recogniser go now.
        let mut s = lock(&self.state);
        s.abandoned = true;
        s.done = None;
        s.pending = Vec::new();
        if !s.busy {
            s.recognizer = None;
        }
    }
}
