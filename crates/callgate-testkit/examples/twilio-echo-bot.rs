//! A Twilio Media Streams echo bot for `bench/bridge.sh`: listens on 127.0.0.1 (a free port,
//! printed as `listening PORT`), echoes every caller `media` back at once with the same
//! payload, and records nothing. Runs until killed.

use callgate_testkit::twilio_bot::{Bot, BotConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bot = Bot::start(BotConfig {
        echo: true,
        unobserved: true,
        ..Default::default()
    })
    .await;
    let url = bot.url("/");
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    println!("listening {port}");
    std::future::pending::<()>().await;
}
