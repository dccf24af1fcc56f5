//! Talking to clipd: requests with the caller's credentials, progress
//! bars and warnings on the terminal.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use anyhow::{Context, Result};
use clip_api::{Client, Credential, ImageSpec, Reply, Request};
use clip_registry::ImageRef;

/// The host's platform, as image indexes name it.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// The caller's credentials for the image's registry, resolved here (the
/// daemon cannot read the caller's Docker config or run its helpers).
fn creds_for(image: &str) -> BTreeMap<String, Credential> {
    let mut m = BTreeMap::new();
    if let Ok(ImageRef::Registry(r)) = ImageRef::parse(image) {
        if let Some(c) = crate::source::creds().get(r.registry()) {
            m.insert(r.registry().to_string(), c.into());
        }
    }
    m
}

pub fn spec(image: &str, platform: &str, checkpoint_mib: Option<u64>) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        platform: platform.to_string(),
        creds: creds_for(image),
        checkpoint_mib,
    }
}

/// Requests that mean the same when sent twice.
fn idempotent(req: &Request) -> bool {
    matches!(
        req,
        Request::Ping | Request::Ps | Request::Metrics { .. } | Request::Index { .. } | Request::Mount { .. }
    )
}

/// Sends a request to the host's clipd (started if none runs), showing
/// progress on a terminal and warnings on stderr. An idempotent request
/// whose connection the daemon dropped (its worker died mid-request) is
/// sent once more, to the next worker.
pub fn call(req: &Request) -> Result<Reply> {
    match call_once(req) {
        Err(e) if idempotent(req) && dropped(&e) => {
            std::thread::sleep(std::time::Duration::from_millis(200));
            call_once(req)
        }
        r => r,
    }
}

fn dropped(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<clip_api::Error>().is_some_and(api_dropped))
}

fn api_dropped(e: &clip_api::Error) -> bool {
    match e {
        clip_api::Error::NoReply => true,
        clip_api::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn call_once(req: &Request) -> Result<Reply> {
    let run = clip_api::run_dir();
    let client = Client::connect(&run, true).context("connecting to clipd")?;
    let bar: std::cell::RefCell<Option<indicatif::ProgressBar>> = std::cell::RefCell::new(None);
    let tty = std::io::stderr().is_terminal();
    let r = client.call(req, |r| match r {
        Reply::Progress { what, done, total } if tty => {
            let mut b = bar.borrow_mut();
            let b = b.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(*total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(what.clone());
                b
            });
            b.set_position(*done);
        }
        Reply::Warning { message } => eprintln!("clipctl: warning: {message}"),
        _ => {}
    });
    if let Some(b) = bar.borrow().as_ref() {
        b.finish_and_clear();
    }
    Ok(r?)
}

/// Asks a running clipd, without starting one.
pub fn call_running(req: &Request) -> Result<Option<Reply>> {
    let run = clip_api::run_dir();
    match Client::connect(&run, false) {
        Ok(c) => match c.call(req, |_| {}) {
            Ok(r) => Ok(Some(r)),
            Err(e) if idempotent(req) && api_dropped(&e) => {
                std::thread::sleep(std::time::Duration::from_millis(200));
                Ok(Some(Client::connect(&run, false)?.call(req, |_| {})?))
            }
            Err(e) => Err(e.into()),
        },
        Err(clip_api::Error::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
