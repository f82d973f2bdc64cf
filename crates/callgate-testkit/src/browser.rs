//! A real headless Chromium driven over WebDriver (W3C), for the console's browser tests.
//!
//! [`Browser::start`] runs Debian's `chromedriver` on a port of its own choosing (read back
//! from its first lines of output) and opens one Chromium session with a fresh profile, no
//! network beyond loopback services it is pointed at, and the flags CI needs. The client is a
//! few WebDriver commands over the testkit's own HTTP client: no WebDriver crate.
//!
//! Waiting is done in the page: [`Browser::wait_for`] runs a `MutationObserver` that answers
//! as soon as the selector matches, so tests follow the page's own changes; its deadline only
//! turns a page that never changes into a failure.
//!
//! Browser tests run when `CALLGATE_TEST_CHROMIUM=1` ([`enabled`]); CI installs `chromium`
//! and `chromium-driver` and sets it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::TempDir;

/// Whether the browser tests should run (`CALLGATE_TEST_CHROMIUM=1`).
pub fn enabled() -> bool {
    std::env::var("CALLGATE_TEST_CHROMIUM").is_ok_and(|v| v == "1")
}

/// The Chromium flags every session gets (besides its own `--user-data-dir`).
pub const FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
];

/// A Chromium session and the chromedriver that runs it; both end when it is dropped.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: TempDir,
}

/// A page element, as WebDriver names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts chromedriver and a Chromium session whose preferred language is `lang`
    /// (`en-US`, `ko-KR`...).
    pub async fn start(lang: &str) -> Self {
        let chromium =
            std::env::var("CALLGATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut driver = Command::new(
            std::env::var("CALLGATE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver (apt-get install chromium chromium-driver)");
        let stdout = driver.stdout.take().expect("chromedriver's stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next_line()
                .await
                .expect("read chromedriver's output")
                .expect("chromedriver said which port it listens on");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest
                    .trim_end_matches('.')
                    .trim()
                    .parse::<u16>()
                    .expect("chromedriver's port");
            }
        };
        // Keep reading its output so it never blocks on a full pipe.
        callgate_server::Tasks::new()
            .spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let profile = TempDir::new("chromium-profile");
        let mut args: Vec<String> = FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--lang={lang}"));
        args.push(format!("--accept-lang={lang}"));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
                "prefs": {"intl.accept_languages": lang},
            },
            "timeouts": {"script": 30_000, "pageLoad": 30_000, "implicit": 0},
        }}});
        let (status, body) = call(addr, "POST", "/session", &capabilities).await;
        assert_eq!(status, 200, "WebDriver session: {body}");
        let session = body["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Self {
            driver,
            addr,
            session,
            _profile: profile,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, body) = call(self.addr, method, &path, &body).await;
        assert_eq!(status, 200, "WebDriver {method} {path}: {body}");
        body["value"].clone()
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let path = format!("/session/{}/element", self.session);
        let (status, body) = call(
            self.addr,
            "POST",
            &path,
            &json!({"using": "css selector", "value": css}),
        )
        .await;
        match status {
            200 => body["value"][ELEMENT_KEY]
                .as_str()
                .map(|id| Element(id.to_owned())),
            404 => None,
            _ => panic!("WebDriver find {css:?}: {status} {body}"),
        }
    }

    /// The element matching `css`, once the page has one (waiting up to `within`).
    pub async fn element(&self, css: &str, within: Duration) -> Element {
        assert!(
            self.wait_for(css, within).await,
            "no {css:?} on the page within {within:?}"
        );
        self.find(css).await.expect("the element just seen")
    }

    /// Clicks an element.
    pub async fn click(&self, element: &Element) {
        self.command("POST", &format!("/element/{}/click", element.0), json!({}))
            .await;
    }

    /// Types into an element.
    pub async fn type_text(&self, element: &Element, text: &str) {
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            json!({ "text": text }),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Runs `script`, which calls its last argument with the result when it is done.
    pub async fn execute_async(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/async",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Waits, in the page, until `css` matches something; false if it did not within
    /// `within`.
    pub async fn wait_for(&self, css: &str, within: Duration) -> bool {
        self.wait_until(
            "document.querySelector(args[0]) !== null",
            json!([css]),
            within,
        )
        .await
    }

    /// Waits, in the page, until `css` matches nothing; false if it still did after `within`.
    pub async fn wait_gone(&self, css: &str, within: Duration) -> bool {
        self.wait_until(
            "document.querySelector(args[0]) === null",
            json!([css]),
            within,
        )
        .await
    }

    /// Waits, in the page, until `condition` (a JavaScript expression over `args`, the array
    /// given) holds: checked now and on every change of the document.
    pub async fn wait_until(&self, condition: &str, args: Value, within: Duration) -> bool {
        let script = format!(
            "const args = Array.prototype.slice.call(arguments, 0, arguments.length - 1);
             const done = arguments[arguments.length - 1];
             const check = () => {{ try {{ return Boolean({condition}); }} catch (_) {{ return false; }} }};
             if (check()) {{ done(true); return; }}
             let timer = null;
             const observer = new MutationObserver(() => {{
               if (check()) {{ observer.disconnect(); clearTimeout(timer); done(true); }}
             }});
             observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
             timer = setTimeout(() => {{ observer.disconnect(); done(check()); }}, {ms});",
            ms = within.as_millis()
        );
        let args = match args {
            Value::Array(list) => Value::Array(list),
            other => Value::Array(vec![other]),
        };
        self.execute_async(&script, args).await.as_bool() == Some(true)
    }

    /// Saves a PNG screenshot of the page to `path` (its directory is created).
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let png = self.command("GET", "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a screenshot"))
            .expect("a base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot directory");
        }
        std::fs::write(path, bytes).expect("write the screenshot");
    }

    /// Ends the session and chromedriver.
    pub async fn close(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = call(self.addr, "DELETE", &path, &Value::Null).await;
        let _ = self.driver.kill().await;
    }
}

/// Where a test's screenshots go: `target/console-screenshots/` (or under
/// `CARGO_TARGET_DIR`).
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("console-screenshots")
}

/// The longest one WebDriver command may take (a page's own waits are bounded below it).
const WEBDRIVER_WAIT: Duration = Duration::from_secs(60);

/// One WebDriver request: status and JSON body.
async fn call(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, reply) = tokio::time::timeout(WEBDRIVER_WAIT, exchange(addr, method, path, &text))
        .await
        .unwrap_or_else(|_| {
            panic!("WebDriver {method} {path} did not answer in {WEBDRIVER_WAIT:?}")
        });
    (
        status,
        serde_json::from_str(&reply).unwrap_or(Value::String(reply)),
    )
}

/// One HTTP/1.1 exchange with chromedriver, which keeps the connection open after its answer
/// (whatever `Connection: close` says): the answer ends at its `Content-Length`.
async fn exchange(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to chromedriver");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write to chromedriver");
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).into_owned();
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if let Some(length) = length.filter(|n| raw.len() >= split + 4 + n) {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("a status code");
                let body = String::from_utf8_lossy(&raw[split + 4..split + 4 + length]);
                return (status, body.into_owned());
            }
        }
        let n = stream.read(&mut buf).await.expect("read from chromedriver");
        assert!(n > 0, "chromedriver closed the connection mid-answer");
        raw.extend_from_slice(&buf[..n]);
    }
}
