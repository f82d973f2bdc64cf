//! The rest of the issue's attacks, which callgate already withstood when it was filed (they
//! are here so that it keeps doing so, with the canary watching): abrupt resets, frame headers
//! announcing 100 MB, a message in a million one-byte fragments, pings and keys at 10,000 a
//! second.

use std::time::{Duration, Instant};

use callgate_server::Tasks;
use callgate_testkit::incoming_call;
use callgate_testkit::phone::WAIT;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use super::raw::*;
use super::support::*;

/// A call placed over a raw socket: upgraded by hand, started, answered.
async fn raw_call(rig: &Rig, id: &str) -> tokio::net::TcpStream {
    let mut stream = connect_from(&rig.server, ATTACKER).await.expect("connect");
    raw_upgrade(&mut stream).await;
    stream
        .write_all(&client_frame(1, incoming_call(id).as_bytes()))
        .await
        .expect("start sent");
    stream
}

/// Calls that vanish: answered, then reset (SO_LINGER 0) without a close. Every record ends
/// and every descriptor comes back.
#[tokio::test]
async fn calls_reset_abruptly_leave_ended_records_and_no_descriptor() {
    let calls = Strength::get().pick(50, 500);
    let mut rig = Rig::start("abrupt resets", |_| {}).await;
    let canary = rig.canary().await;
    let began = Instant::now();
    for batch in 0..calls / 50 {
        let placed = futures_util::future::join_all((0..50).map(|k| {
            let server = &rig.server;
            async move { place_call(server, ATTACKER, &format!("reset-{batch}-{k}")).await }
        }))
        .await;
        for ws in placed {
            let ws = ws.expect("answered");
            socket2::SockRef::from(ws.get_ref())
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
            drop(ws);
        }
    }
    rig.figure("calls reset", calls);
    rig.figure("placing and resetting took (ms)", ms(began.elapsed()));
    rig.finish(canary).await;
}

/// Frame headers announcing 100 MB, as a first message and mid-call: closed with 1009 at once,
/// nothing allocated for them.
#[tokio::test]
async fn frame_headers_announcing_100_mb_are_closed_with_1009() {
    let attempts = Strength::get().pick(4, 20);
    let mut rig = Rig::start("100 MB frame headers", |_| {}).await;
    let canary = rig.canary().await;
    let phase = rig.phase();
    let mut codes = Vec::new();
    for k in 0..attempts {
        let mut stream = if k % 2 == 0 {
            let mut s = connect_from(&rig.server, ATTACKER).await.expect("connect");
            raw_upgrade(&mut s).await;
            s
        } else {
            raw_call(&rig, &format!("header-{k}")).await
        };
        let mut attack = frame_header(2, 100_000_000);
        attack.extend(std::iter::repeat_n(0u8, 64 * 1024));
        stream.write_all(&attack).await.expect("header sent");
        let (mut r, _w) = stream.into_split();
        let code = tokio::time::timeout(WAIT, read_close(&mut r))
            .await
            .expect("closed in time")
            .expect("a close frame");
        codes.push(code);
    }
    rig.figure("headers", attempts);
    rig.figure("memory growth (MiB)", mib(phase.grew()));
    rig.expect(codes.iter().all(|&c| c == 1009), format!("{codes:?}"));
    rig.finish(canary).await;
}

/// One text message in one-byte fragments (the issue: 1.2 million). Below the message limit it
/// is a message like any other; past it (the long run: 1.2 MB) the call is closed with 1009.
#[tokio::test]
async fn a_message_in_one_byte_fragments() {
    let fragments = Strength::get().pick(50_000, 1_200_000);
    let mut rig = Rig::start("one-byte fragments", |_| {}).await;
    let canary = rig.canary().await;
    let mut message = br#"{"event":"noise","pad":""#.to_vec();
    message.resize(fragments - 2, b'f');
    message.extend_from_slice(b"\"}");
    // Built before the attack: 7 bytes a fragment on the wire.
    let mut wire = Vec::with_capacity(fragments * 7);
    for (i, byte) in message.iter().enumerate() {
        let opcode = if i == 0 { 1 } else { 0 };
        wire.extend_from_slice(&fragment_header(i + 1 == fragments, opcode, 1));
        wire.push(*byte);
    }
    wire.extend_from_slice(&client_frame(2, &[9u8; 320]));
    let phase = rig.phase();
    let began = Instant::now();
    let stream = raw_call(&rig, "fragments").await;
    let (mut r, mut w) = stream.into_split();
    let writer = Tasks::new().spawn(async move {
        for chunk in wire.chunks(64 * 1024) {
            if w.write_all(chunk).await.is_err() {
                break;
            }
        }
        w
    });
    // The answer, then either the echo of the audio after the message or the close.
    let mut outcome = None;
    while outcome.is_none() {
        let (opcode, payload) = tokio::time::timeout(WAIT * 6, read_frame(&mut r))
            .await
            .expect("the server answers in time")
            .expect("a frame");
        match opcode {
            2 => outcome = Some("echoed".to_owned()),
            8 => {
                outcome = Some(format!(
                    "closed {}",
                    u16::from_be_bytes([payload[0], payload[1]])
                ))
            }
            _ => {}
        }
    }
    let mut w = writer.await.expect("the writer");
    let outcome = outcome.unwrap_or_default();
    rig.figure("fragments", fragments);
    rig.figure("outcome", outcome.as_str());
    rig.figure("took (ms)", ms(began.elapsed()));
    rig.figure("memory growth (MiB)", mib(phase.grew()));
    if fragments > 1 << 20 {
        assert_eq!(outcome, "closed 1009");
        let _ = w.shutdown().await;
    } else {
        assert_eq!(outcome, "echoed");
        // The call goes on to its end: the attacker hangs up.
        w.write_all(&client_frame(1, br#"{"event":"hangup"}"#))
            .await
            .unwrap();
        w.write_all(&client_frame(
            1,
            callgate_testkit::cdr("fragments").as_bytes(),
        ))
        .await
        .unwrap();
        let code = tokio::time::timeout(WAIT, read_close(&mut r)).await;
        assert!(matches!(code, Ok(Ok(1000))), "{code:?}");
    }
    drop((r, w));
    rig.finish(canary).await;
}

/// Sends `per_second` messages a second made by `make` for `seconds` on an answered call,
/// reading (and discarding) what the call sends meanwhile; then one frame of audio must come
/// back unchanged.
async fn at_rate(
    ws: Ws,
    per_second: usize,
    seconds: usize,
    make: impl Fn(usize) -> Message,
) -> (Ws, usize) {
    let (mut tx, mut rx) = ws.split();
    let reader = Tasks::new().spawn(async move {
        let mut received = 0;
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Binary(_)) {
                return (rx, received, true);
            }
            received += 1;
        }
        (rx, received, false)
    });
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    for _ in 0..seconds * 100 {
        tick.tick().await;
        for _ in 0..per_second / 100 {
            tx.feed(make(sent)).await.expect("sent");
            sent += 1;
        }
        tx.flush().await.expect("flushed");
    }
    tx.send(Message::Binary(vec![5u8; 320].into()))
        .await
        .expect("audio sent");
    let (rx, received, echoed) = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the call's audio comes back")
        .expect("the reader");
    assert!(echoed, "the call was dropped");
    (tx.reunite(rx).expect("one socket"), received)
}

/// Pings at 10,000 a second (the short version: 1,000): answered, and the call goes on.
#[tokio::test]
async fn pings_at_ten_thousand_a_second() {
    let strength = Strength::get();
    let (rate, seconds) = strength.pick((1_000, 1), (10_000, 5));
    let mut rig = Rig::start("pings at 10,000/s", |_| {}).await;
    let canary = rig.canary().await;
    let ws = place_call(&rig.server, ATTACKER, "pinger")
        .await
        .expect("answered");
    let began = Instant::now();
    let (mut ws, pongs) = at_rate(ws, rate, seconds, |k| {
        Message::Ping((k as u64).to_be_bytes().to_vec().into())
    })
    .await;
    rig.figure("pings sent", rate * seconds);
    rig.figure("messages back (pongs)", pongs);
    rig.figure("took (ms)", ms(began.elapsed()));
    assert_eq!(hang_up(&mut ws, "pinger").await.0, 1000);
    rig.finish(canary).await;
}

/// Keys at 10,000 a second (the short version: 1,000): the agent hears them, the record keeps
/// its caps, and the call goes on.
#[tokio::test]
async fn keys_at_ten_thousand_a_second() {
    let strength = Strength::get();
    let (rate, seconds) = strength.pick((1_000, 1), (10_000, 5));
    let mut rig = Rig::start("DTMF at 10,000/s", |_| {}).await;
    let canary = rig.canary().await;
    let ws = place_call(&rig.server, ATTACKER, "keys")
        .await
        .expect("answered");
    let began = Instant::now();
    let (mut ws, _) = at_rate(ws, rate, seconds, |k| {
        let digit = char::from(b'0' + (k % 10) as u8);
        Message::Text(format!(r#"{{"event":"dtmf","digit":"{digit}"}}"#).into())
    })
    .await;
    let took = began.elapsed();
    assert_eq!(hang_up(&mut ws, "keys").await.0, 1000);
    let id = record_id(rig.server.admin_addr, "keys").await;
    let record = ended_record(rig.server.admin_addr, &id).await;
    let events = all_events(rig.server.admin_addr, &id).await;
    rig.figure("keys sent", rate * seconds);
    rig.figure("took (ms)", ms(took));
    rig.figure(
        "keys in the record",
        record["dtmf"].as_str().unwrap_or("").len(),
    );
    rig.figure("events stored", events.len());
    rig.expect(
        record["end_reason"] == "peer_hangup",
        format!("{record:.300}"),
    );
    rig.expect(
        record["dtmf"].as_str().unwrap_or("").len() <= 1000,
        "over 1,000 keys",
    );
    rig.expect(events.len() <= 10_003, format!("{} events", events.len()));
    rig.finish(canary).await;
}
