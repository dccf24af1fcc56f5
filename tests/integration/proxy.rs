//! A fault-injecting HTTP proxy on loopback, in front of the test registry:
//! it answers 500 or 429, drops connections mid-body, stalls, and flips
//! bytes, on demand. One request per connection (it forces
//! `Connection: close`), so every fault hits exactly one request.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status(u16),
    /// Send headers and this many body bytes, then close.
    DropAfter(u64),
    /// Wait this long before sending anything back.
    Stall(Duration),
    /// Flip one bit of the body byte at this position.
    FlipAt(u64),
}

/// Blob requests: (path, Range header, when it came, when it was done).
pub type RequestLog = Vec<(String, Option<String>, Instant, Instant)>;

#[derive(Default)]
struct Plan {
    /// Faults for the next blob requests, in order.
    queue: Vec<Fault>,
    /// A fault for every blob request once the queue is empty.
    always: Option<Fault>,
    /// Forward requests without their Range header, as a registry (or a
    /// proxy in front of one) that does not support ranges.
    ignore_range: bool,
    /// Act as a registry with token authentication: see [`FaultProxy::bearer`].
    bearer: Option<Bearer>,
}

/// A token service in front of the registry: `GET /token` with Basic
/// credentials issues a token; every registry request needs a live one.
struct Bearer {
    user: String,
    password: String,
    tokens: Vec<String>,
    issued: u64,
}

pub struct FaultProxy {
    pub port: u16,
    plan: Arc<Mutex<Plan>>,
    stop: Arc<AtomicBool>,
    pub blob_requests: Arc<AtomicU64>,
    pub token_requests: Arc<AtomicU64>,
    /// Every blob request: its path and Range header.
    pub log: Arc<Mutex<RequestLog>>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let blob_requests = Arc::new(AtomicU64::new(0));
        let token_requests = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (p, s, b, t, l) = (
            plan.clone(),
            stop.clone(),
            blob_requests.clone(),
            token_requests.clone(),
            log.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, b, t, l) = (p.clone(), b.clone(), t.clone(), l.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, port, &p, &b, &t, &l);
                });
            }
        });
        FaultProxy {
            port,
            plan,
            stop,
            blob_requests,
            token_requests,
            log,
        }
    }

    /// Forward requests without Range from now on.
    pub fn ignore_range(&self, on: bool) {
        self.plan.lock().unwrap().ignore_range = on;
    }

    /// Requires bearer tokens from now on, issued for `user`:`password`.
    pub fn bearer(&self, user: &str, password: &str) {
        self.plan.lock().unwrap().bearer = Some(Bearer {
            user: user.into(),
            password: password.into(),
            tokens: Vec::new(),
            issued: 0,
        });
    }

    /// Every token issued so far stops working (as when they expire), and
    /// from now on only `password` gets new ones (a rotated credential).
    pub fn rotate(&self, password: &str) {
        let mut p = self.plan.lock().unwrap();
        let b = p.bearer.as_mut().expect("bearer mode");
        b.tokens.clear();
        b.password = password.into();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Faults for the next blob requests, one each.
    pub fn queue(&self, faults: &[Fault]) {
        self.plan.lock().unwrap().queue.extend_from_slice(faults);
    }

    /// A fault for every blob request from now on (None: none).
    pub fn always(&self, fault: Option<Fault>) {
        self.plan.lock().unwrap().always = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    Ok(head)
}

fn reply(client: &mut TcpStream, status: &str, headers: &str, body: &str) -> std::io::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.shutdown(Shutdown::Both)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Decodes standard base64 (Basic credentials).
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Answers token requests and refuses registry requests without a live
/// token; Some(()) when the request was answered here.
fn bearer_gate(client: &mut TcpStream, text: &str, port: u16, plan: &Mutex<Plan>, tokens: &AtomicU64) -> Option<()> {
    let mut p = plan.lock().unwrap();
    let b = p.bearer.as_mut()?;
    let path = text.split_whitespace().nth(1).unwrap_or("");
    if path.starts_with("/token") {
        tokens.fetch_add(1, Ordering::Relaxed);
        let basic = header(text, "authorization")
            .and_then(|v| v.strip_prefix("Basic "))
            .map(|v| String::from_utf8_lossy(&unbase64(v)).into_owned());
        if basic.as_deref() == Some(&format!("{}:{}", b.user, b.password)) {
            b.issued += 1;
            let t = format!("token-{}", b.issued);
            b.tokens.push(t.clone());
            let body = format!(r#"{{"token":"{t}","expires_in":300}}"#);
            let _ = reply(client, "200 OK", "Content-Type: application/json\r\n", &body);
        } else {
            let _ = reply(
                client,
                "401 Unauthorized",
                "",
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            );
        }
        return Some(());
    }
    let live = header(text, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| b.tokens.iter().any(|x| x == t));
    if live {
        return None;
    }
    let challenge = format!(
        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"clip-test\",scope=\"repository:clip:pull\"\r\n"
    );
    let _ = reply(
        client,
        "401 Unauthorized",
        &challenge,
        r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
    );
    Some(())
}

fn serve(
    mut client: TcpStream,
    upstream: u16,
    port: u16,
    plan: &Mutex<Plan>,
    blobs: &AtomicU64,
    tokens: &AtomicU64,
    log: &Mutex<RequestLog>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    if bearer_gate(&mut client, &text, port, plan, tokens).is_some() {
        return Ok(());
    }
    let is_blob = text.lines().next().is_some_and(|l| l.contains("/blobs/sha256:"));
    let came = Instant::now();
    let fault = if is_blob {
        blobs.fetch_add(1, Ordering::Relaxed);
        let mut p = plan.lock().unwrap();
        if p.queue.is_empty() {
            p.always
        } else {
            Some(p.queue.remove(0))
        }
    } else {
        None
    };
    let ignore_range = plan.lock().unwrap().ignore_range;
    match fault {
        Some(Fault::Status(code)) => {
            let reason = if code == 429 {
                "Too Many Requests"
            } else {
                "Internal Server Error"
            };
            write!(
                client,
                "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return client.shutdown(Shutdown::Both);
        }
        Some(Fault::Stall(d)) => std::thread::sleep(d),
        _ => {}
    }
    // Forward with Connection: close so that one connection is one request.
    let mut req = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        // The registry behind has no auth; and Range may be dropped.
        let dropped = lower.starts_with("connection:")
            || lower.starts_with("authorization:")
            || (ignore_range && lower.starts_with("range:"));
        if !dropped {
            req.push_str(line);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(req.as_bytes())?;
    let resp_head = read_head(&mut up)?;
    client.write_all(&resp_head)?;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &mut buf[..n];
        if let Some(Fault::FlipAt(at)) = fault {
            if at >= sent && at < sent + n as u64 {
                chunk[(at - sent) as usize] ^= 0x01;
            }
        }
        if let Some(Fault::DropAfter(limit)) = fault {
            let allowed = limit.saturating_sub(sent).min(n as u64) as usize;
            client.write_all(&chunk[..allowed])?;
            if sent + n as u64 >= limit {
                // An abrupt reset, as a crashed server or middlebox sends.
                return client.shutdown(Shutdown::Both);
            }
        } else {
            client.write_all(chunk)?;
        }
        sent += n as u64;
    }
    if is_blob {
        let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
        let range = header(&text, "range").map(str::to_string);
        log.lock().unwrap().push((path, range, came, Instant::now()));
    }
    client.shutdown(Shutdown::Both)
}

/// Asserts that every request in `log` for one of `layers` read a bounded
/// range (no whole-layer GET); returns how many there were.
pub fn assert_ranges_only(log: &RequestLog, layers: &[String]) -> usize {
    let mut n = 0;
    for (path, range, ..) in log {
        if layers.iter().any(|l| path.ends_with(l.as_str())) {
            let r = range.as_deref().unwrap_or_else(|| panic!("a full-layer GET of {path}"));
            assert!(!r.ends_with('-'), "an open-ended range of {path}: {r}");
            n += 1;
        }
    }
    n
}
