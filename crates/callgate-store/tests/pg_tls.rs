//! TLS to PostgreSQL: `sslmode=require` encrypts, `verify-full` checks the certificate against
//! the CA file and the host, and neither falls back to plain TCP. On a server of the test's own
//! with a throwaway CA (`PG_TEST_SSL=1 scripts/pg-test-server`, port
//! `CALLGATE_TEST_PG_TLS_PORT`, default 25436); runs when `CALLGATE_TEST_PG` is set.

#![allow(clippy::unwrap_used, reason = "tests: a failure is the test failing")]

mod common;

use callgate_store::{CallFilter, PgStore, PgUrl, Reader, Store};
use common::{Server, TempDir, off_runtime, pg_url};

/// Opens a store at `url` (in a fresh data dir), writes a call and reads it back.
fn round_trip(url: PgUrl) -> Result<(), callgate_store::Error> {
    off_runtime(move || {
        let dir = TempDir::new();
        let mut store = PgStore::open(&url, &dir.0)?;
        let call = callgate_store::NewCall {
            id: callgate_store::CallId::new(),
            protocol: "inbound".into(),
            caller: "1".into(),
            callee: "2".into(),
            external_id: "tls".into(),
            call_config: None,
            phone_output_audio_format: "PCM_8000".into(),
            phone_input_audio_format: "PCM_8000".into(),
            started_at: callgate_store::UnixMillis(1),
            recording: false,
            route: None,
            agent: None,
            key_name: None,
            node: None,
        };
        store.insert_call(&call)?;
        let listed = store.open_reader()?.list_calls(&CallFilter::newest(1000))?;
        assert!(listed.iter().any(|c| c.id == call.id));
        Ok(())
    })
}

fn with_mode(url: &str, mode: &str) -> String {
    url.replace("sslmode=disable", &format!("sslmode={mode}"))
}

#[test]
fn postgres_tls_encrypts_and_verifies() {
    let Some(plain) = pg_url("postgres_tls_encrypts_and_verifies") else {
        return;
    };
    let port = std::env::var("CALLGATE_TEST_PG_TLS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(25436);
    let server = Server::start(port, true);
    let ca = server.ca.clone().unwrap();

    round_trip(PgUrl::parse(&with_mode(&server.url, "require"), None).unwrap()).unwrap();
    round_trip(PgUrl::parse(&with_mode(&server.url, "verify-full"), Some(&ca)).unwrap()).unwrap();

    // A CA that did not sign the server's certificate: refused, no fallback to plain TCP.
    let other = TempDir::new();
    let wrong = other.0.join("wrong-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=wrong CA", "-keyout"])
        .arg(other.0.join("wrong.key"))
        .arg("-out")
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {made:?}");
    let e = round_trip(PgUrl::parse(&with_mode(&server.url, "verify-full"), Some(&wrong)).unwrap())
        .unwrap_err();
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    // The right CA, the wrong host name: the server at 127.0.0.1 (`hostaddr`) reached under a
    // name its certificate does not carry.
    let url = with_mode(&server.url, "verify-full").replace("@127.0.0.1:", "@db.invalid:")
        + "&hostaddr=127.0.0.1";
    let e = round_trip(PgUrl::parse(&url, Some(&ca)).unwrap()).unwrap_err();
    assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");

    // `require` against a server without TLS (the shared test server): refused.
    let e = round_trip(PgUrl::parse(&with_mode(&plain, "require"), None).unwrap()).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
}
