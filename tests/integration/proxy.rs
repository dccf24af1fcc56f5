//! A fault-injecting HTTP proxy on loopback, in front of the test registry:
//! it answers 500 or 429, drops connections mid-body, stalls, and flips
//! bytes, on demand. One request per connection (it forces
//! `Connection: close`), so every fault hits exactly one request.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[derive(Default)]
struct Plan {
    /// Faults for the next blob requests, in order.
    queue: Vec<Fault>,
    /// A fault for every blob request once the queue is empty.
    always: Option<Fault>,
}

pub struct FaultProxy {
    pub port: u16,
    plan: Arc<Mutex<Plan>>,
    stop: Arc<AtomicBool>,
    pub blob_requests: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let blob_requests = Arc::new(AtomicU64::new(0));
        let (p, s, b) = (plan.clone(), stop.clone(), blob_requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, b) = (p.clone(), b.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &p, &b);
                });
            }
        });
        FaultProxy {
            port,
            plan,
            stop,
            blob_requests,
        }
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

fn serve(mut client: TcpStream, upstream: u16, plan: &Mutex<Plan>, blobs: &AtomicU64) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let is_blob = text.lines().next().is_some_and(|l| l.contains("/blobs/sha256:"));
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
        if !line.to_ascii_lowercase().starts_with("connection:") {
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
    client.shutdown(Shutdown::Both)
}
