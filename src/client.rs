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
/// progress on a terminal and warnings on stderr. A request the daemon
/// dropped goes again, to the next worker, as [`resend`] allows.
pub fn call(req: &Request) -> Result<Reply> {
    resending(req, || call_once(req))
}

/// Runs `once` (one connection, one request) again while it fails in a
/// way [`resend`] allows, at most 5 times, backing off a little each time.
fn resending<T>(req: &Request, mut once: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match once() {
            Err(e) if attempt < 5 && dropped(&e).is_some_and(|d| resend(req, d, attempt)) => {
                std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// How a daemon dropped a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dropped {
    /// Reset or a broken pipe: a Unix socket is reset only when it closes
    /// with the request unread (never accepted, or half read), so no
    /// daemon acted on it. A daemon killed just before the client
    /// connected still holds its listener for the moment its threads take
    /// to exit; the client's connection then lands in a dying backlog.
    Unread,
    /// The connection ended without a reply: the request may have been
    /// acted on.
    Unanswered,
}

/// Whether a request dropped this way is sent again after `attempt`
/// tries: one never read, a few times (a dying daemon's backlog can take
/// one try); one perhaps acted on, once, and only if sending it twice
/// means the same.
fn resend(req: &Request, d: Dropped, attempt: u64) -> bool {
    d == Dropped::Unread || (attempt == 1 && idempotent(req))
}

fn dropped(e: &anyhow::Error) -> Option<Dropped> {
    e.chain()
        .find_map(|c| c.downcast_ref::<clip_api::Error>().and_then(api_dropped))
}

fn api_dropped(e: &clip_api::Error) -> Option<Dropped> {
    match e {
        clip_api::Error::NoReply => Some(Dropped::Unanswered),
        clip_api::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Some(Dropped::Unread),
            std::io::ErrorKind::UnexpectedEof => Some(Dropped::Unanswered),
            _ => None,
        },
        _ => None,
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
    let mut first = match Client::connect(&run, false) {
        Ok(c) => Some(c),
        Err(clip_api::Error::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    resending(req, || {
        let c = match first.take() {
            Some(c) => c,
            None => Client::connect(&run, false)?,
        };
        Ok(c.call(req, |_| {})?)
    })
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// What a client sees of a daemon that dies before or after reading
    /// its request, on real sockets.
    fn drop_at(read_first: bool) -> Option<Dropped> {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let client = Client::from_stream(UnixStream::connect(dir.path().join("s")).unwrap());
        let waiter = std::thread::spawn(move || client.call(&Request::Ps, |_| {}).unwrap_err());
        if read_first {
            let (mut conn, _) = listener.accept().unwrap();
            let req: Option<Request> = clip_api::read_frame(&mut conn).unwrap();
            assert!(req.is_some());
        }
        // Otherwise the request is in the backlog, unread (or not yet
        // written: the write then fails), when the listener goes.
        drop(listener);
        api_dropped(&waiter.join().unwrap())
    }

    #[test]
    fn a_request_the_daemon_never_read_is_sent_again_and_one_it_read_only_if_idempotent() {
        assert_eq!(drop_at(false), Some(Dropped::Unread));
        assert_eq!(drop_at(true), Some(Dropped::Unanswered));
        let umount = Request::Umount { dir: "/mnt".into() };
        assert!(resend(&umount, Dropped::Unread, 1));
        assert!(resend(&umount, Dropped::Unread, 3));
        assert!(!resend(&umount, Dropped::Unanswered, 1));
        assert!(resend(&Request::Ps, Dropped::Unanswered, 1));
        assert!(!resend(&Request::Ps, Dropped::Unanswered, 2));
        assert_eq!(api_dropped(&clip_api::Error::Daemon("no".into())), None);
    }
}
