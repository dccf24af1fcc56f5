//! Linux clauses: namespaces, cgroups, seccomp, sysctl, hostname, terminal.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use serde_json::json;

use crate::clauses::{expect, Clause};
use crate::ensure;
use crate::harness::{new_id, Bundle, Rt};

const LC: &str = "libcontainer";

/// Our namespace of type `ns` (as /proc/self/ns names it).
fn host_ns(ns: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{ns}"))
        .unwrap()
        .display()
        .to_string()
}

/// Runs with the namespace `ty` added; the container's /proc/self/ns/`file`.
fn ns_inside(rt: &Rt, ty: &str, file: &str) -> Result<String, String> {
    let mut b = Bundle::new();
    let has = b.config["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["type"] == ty);
    if !has {
        b.push("/linux/namespaces", json!({"type": ty}));
    }
    if ty == "user" {
        b.set(
            "/linux/uidMappings",
            json!([{"containerID": 0, "hostID": 100000, "size": 65536}]),
        );
        b.set(
            "/linux/gidMappings",
            json!([{"containerID": 0, "hostID": 100000, "size": 65536}]),
        );
    }
    Ok(rt
        .sh(&mut b, &format!("readlink /proc/self/ns/{file}"))?
        .trim()
        .to_string())
}

fn ns_clause(text: &'static str, check: fn(&Rt) -> Result<(), String>) -> Clause {
    Clause {
        group: "namespaces",
        section: "config-linux.md#namespaces",
        text,
        by: LC,
        check,
    }
}

fn ns_check(rt: &Rt, ty: &str, file: &str) -> Result<(), String> {
    let inside = ns_inside(rt, ty, file)?;
    ensure!(
        !inside.is_empty() && inside != host_ns(file),
        "{file} namespace {inside} is the host's"
    );
    Ok(())
}

/// The host cgroup v1 directory of `pid` for `controller`.
fn cgroup_dir(pid: i64, controller: &str) -> Option<String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cg.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| format!("/sys/fs/cgroup/{ctrls}{path}"))
    })
}

/// Creates a sleeping container with `resources`; reads `file` of
/// `controller` from its host cgroup directory.
fn cgroup_value(rt: &Rt, resources: serde_json::Value, controller: &str, file: &str) -> Result<String, String> {
    let mut b = Bundle::new();
    b.set("/process/args", json!(["sleep", "60"]));
    b.set("/linux/resources", resources);
    let id = new_id();
    rt.ok(&["create", "--bundle", b.path(), &id])?;
    let r = (|| {
        let pid = rt.state(&id).ok_or("no state")?["pid"].as_i64().unwrap_or(0);
        let dir = cgroup_dir(pid, controller).ok_or(format!("no {controller} cgroup"))?;
        std::fs::read_to_string(format!("{dir}/{file}")).map_err(|e| format!("{dir}/{file}: {e}"))
    })();
    rt.delete(&id);
    r.map(|s| s.trim().to_string())
}

/// Whether a blkio cgroup here has a weight file: only BFQ gives cgroup v1
/// weights, and a host whose disks all use another scheduler has none.
fn blkio_weight_supported() -> bool {
    let probe = format!("/sys/fs/cgroup/blkio/clip-weight-probe-{}", std::process::id());
    if std::fs::create_dir(&probe).is_err() {
        return false;
    }
    let found = std::fs::read_dir(&probe)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with("weight")))
        .unwrap_or(false);
    let _ = std::fs::remove_dir(&probe);
    found
}

/// Accepts one connection within 10 s.
fn accept(l: &UnixListener) -> Result<UnixStream, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => return Err(format!("no connection: {e}")),
        }
    }
}

/// Receives a message with file descriptors (SCM_RIGHTS).
fn recv_fds(s: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    use std::os::fd::AsRawFd;
    let mut data = vec![0u8; 65536];
    let mut cmsg = vec![0u8; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr over buffers we own; recvmsg fills them, and the
    // descriptors it passes are ours to own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.len();
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(format!("recvmsg: {}", std::io::Error::last_os_error()));
        }
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(*p.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        data.truncate(n as usize);
        Ok((data, fds))
    }
}

fn seccomp(rule: serde_json::Value) -> serde_json::Value {
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [rule]})
}

pub fn all() -> Vec<Clause> {
    vec![
        ns_clause("pid namespace: the process is in a new one", |rt| {
            ns_check(rt, "pid", "pid")
        }),
        ns_clause("network namespace: a new one", |rt| ns_check(rt, "network", "net")),
        ns_clause("ipc namespace: a new one", |rt| ns_check(rt, "ipc", "ipc")),
        ns_clause("uts namespace: a new one", |rt| ns_check(rt, "uts", "uts")),
        ns_clause("mount namespace: a new one", |rt| ns_check(rt, "mount", "mnt")),
        ns_clause("user namespace: a new one (with mappings)", |rt| {
            ns_check(rt, "user", "user")
        }),
        ns_clause("cgroup namespace: a new one", |rt| ns_check(rt, "cgroup", "cgroup")),
        Clause {
            group: "namespaces",
            section: "config-linux.md#namespaces",
            text: "a namespace with a path is joined, not created",
            by: LC,
            check: |rt| {
                let mut a = Bundle::new();
                a.set("/process/args", json!(["sleep", "60"]));
                let ida = new_id();
                rt.ok(&["create", "--bundle", a.path(), &ida])?;
                let r = (|| {
                    let pid = rt.state(&ida).ok_or("no state")?["pid"].as_i64().unwrap_or(0);
                    let want = std::fs::read_link(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
                    let mut b = Bundle::new();
                    let ns = b.config["linux"]["namespaces"].as_array_mut().unwrap();
                    ns.retain(|n| n["type"] != "network");
                    ns.push(json!({"type": "network", "path": format!("/proc/{pid}/ns/net")}));
                    let got = rt.sh(&mut b, "readlink /proc/self/ns/net")?;
                    ensure!(
                        got.trim() == want.display().to_string(),
                        "joined {got:?}, want {want:?}"
                    );
                    Ok(())
                })();
                rt.delete(&ida);
                r
            },
        },
        Clause {
            group: "namespaces",
            section: "config-linux.md#user-namespace-mappings",
            text: "uidMappings and gidMappings are written",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.push("/linux/namespaces", json!({"type": "user"}));
                b.set(
                    "/linux/uidMappings",
                    json!([{"containerID": 0, "hostID": 100000, "size": 65536}]),
                );
                b.set(
                    "/linux/gidMappings",
                    json!([{"containerID": 0, "hostID": 200000, "size": 1000}]),
                );
                let out = rt.sh(&mut b, "cat /proc/self/uid_map /proc/self/gid_map")?;
                let l: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
                ensure!(
                    l == [vec!["0", "100000", "65536"], vec!["0", "200000", "1000"]],
                    "maps {out:?}"
                );
                Ok(())
            },
        },
        // --- cgroups
        Clause {
            group: "cgroups",
            section: "config-linux.md#memory",
            text: "memory limit applied (v1)",
            by: LC,
            check: |rt| {
                let v = cgroup_value(
                    rt,
                    json!({"memory": {"limit": 67108864, "swap": 67108864}}),
                    "memory",
                    "memory.limit_in_bytes",
                )?;
                ensure!(v == "67108864", "memory.limit_in_bytes {v}");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#memory",
            text: "memory limit enforced: a process that needs more is OOM-killed",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/linux/resources/memory", json!({"limit": 33554432, "swap": 33554432}));
                // The shell holds the 100 MB it reads (this host has no swap).
                b.set(
                    "/process/args",
                    json!(["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}"]),
                );
                let (code, _, err) = rt.run(&b);
                ensure!(code != 0, "100 MB held in a 32 MiB cgroup: exit 0 {err}");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#pids",
            text: "pids limit applied and enforced",
            by: LC,
            check: |rt| {
                let v = cgroup_value(rt, json!({"pids": {"limit": 8}}), "pids", "pids.max")?;
                ensure!(v == "8", "pids.max {v}");
                let mut b = Bundle::new();
                b.set("/linux/resources/pids", json!({"limit": 8}));
                // The shell dies when it cannot fork: busybox sh says so.
                b.set(
                    "/process/args",
                    json!([
                        "sh",
                        "-c",
                        "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 3 & done; echo started all"
                    ]),
                );
                let (code, out, err) = rt.run(&b);
                ensure!(
                    code != 0 && !out.contains("started all") && err.contains("fork"),
                    "exit {code} {out:?} {err:?}"
                );
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#cpu",
            text: "cpu shares, quota and period applied",
            by: LC,
            check: |rt| {
                let r = json!({"cpu": {"shares": 512, "quota": 50000, "period": 100000}});
                let q = cgroup_value(rt, r.clone(), "cpu", "cpu.cfs_quota_us")?;
                let s = cgroup_value(rt, r, "cpu", "cpu.shares")?;
                ensure!(q == "50000" && s == "512", "quota {q} shares {s}");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#cpu",
            text: "cpu quota enforced: a busy loop gets at most its share",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/linux/resources/cpu", json!({"quota": 20000, "period": 100000}));
                let out = rt.sh(
                    &mut b,
                    "timeout 1 sh -c 'while :; do :; done'; cat /sys/fs/cgroup/cpuacct/cpuacct.usage",
                )?;
                let ns: u64 = out.trim().parse().map_err(|_| format!("cpuacct.usage {out:?}"))?;
                ensure!(ns < 400_000_000, "{ns} ns of CPU in 1 s at 20%");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#block-io",
            text: "blkio weight applied (enforcement needs disk contention; not checked)",
            by: LC,
            check: |rt| {
                if !blkio_weight_supported() {
                    return Err("n/a: no block device here has a scheduler with blkio weights (BFQ)".into());
                }
                let v = cgroup_value(rt, json!({"blockIO": {"weight": 500}}), "blkio", "blkio.bfq.weight")
                    .or_else(|_| cgroup_value(rt, json!({"blockIO": {"weight": 500}}), "blkio", "blkio.weight"))?;
                ensure!(v == "500", "weight {v}");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#control-groups",
            text: "cgroup mount with ro is read-only: the container cannot raise its own limits",
            by: "clip-runtime (remount read-only after create)",
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/linux/resources/pids", json!({"limit": 50}));
                let out = rt.sh(&mut b, "echo max > /sys/fs/cgroup/pids/pids.max 2>/dev/null && echo wrote || echo refused; cat /sys/fs/cgroup/pids/pids.max")?;
                ensure!(out.lines().collect::<Vec<_>>() == ["refused", "50"], "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "cgroups",
            section: "config-linux.md#control-groups",
            text: "cgroup v2 limits (unified hierarchy)",
            by: LC,
            check: |_| Err("n/a: this host runs cgroup v1 (hybrid); v2 is not testable here".into()),
        },
        // --- seccomp
        Clause {
            group: "seccomp",
            section: "config-linux.md#seccomp",
            text: "seccomp SCMP_ACT_ERRNO returns the errno",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.add_mount(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}));
                b.set(
                    "/linux/seccomp",
                    seccomp(json!({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1})),
                );
                let out = rt.sh(&mut b, "mkdir /tmp/d 2>&1; true")?;
                ensure!(out.contains("Operation not permitted"), "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "seccomp",
            section: "config-linux.md#seccomp",
            text: "seccomp SCMP_ACT_KILL kills the process",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set(
                    "/linux/seccomp",
                    seccomp(json!({"names": ["uname"], "action": "SCMP_ACT_KILL"})),
                );
                b.set("/process/args", json!(["uname"]));
                let (code, out, _) = rt.run(&b);
                ensure!(code == 128 + 31 || code == 128 + 9, "exit {code} {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "seccomp",
            section: "config-linux.md#seccomp",
            text: "seccomp SCMP_ACT_NOTIFY sends the listener fd and state to listenerPath",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                let sock = b.dir.path().join("agent.sock");
                let listener = UnixListener::bind(&sock).map_err(|e| e.to_string())?;
                let mut sc = seccomp(json!({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}));
                sc["listenerPath"] = json!(sock);
                b.set("/linux/seccomp", sc);
                b.set("/process/args", json!(["true"]));
                let agent = std::thread::spawn(move || -> Result<(String, usize), String> {
                    let s = accept(&listener)?;
                    let (data, fds) = recv_fds(&s)?;
                    Ok((String::from_utf8_lossy(&data).into_owned(), fds.len()))
                });
                let id = new_id();
                let o = rt.out(&["create", "--bundle", b.path(), &id]);
                let created = o.status.success();
                // Some runtimes send the fd at create, others when the
                // filter is loaded, just before the process runs.
                if created {
                    let _ = rt.out(&["start", &id]);
                }
                let got = agent.join().unwrap();
                rt.delete(&id);
                ensure!(created, "create: {}", String::from_utf8_lossy(&o.stderr));
                let (state, fds) = got?;
                ensure!(fds >= 1, "no fd received");
                ensure!(state.contains(&id), "state without the id: {state}");
                Ok(())
            },
        },
        // --- misc
        Clause {
            group: "misc",
            section: "config-linux.md#sysctl",
            text: "sysctl values are set in the container",
            by: LC,
            check: |rt| {
                expect(
                    rt,
                    &[("/linux/sysctl", json!({"net.ipv4.ip_forward": "1"}))],
                    "cat /proc/sys/net/ipv4/ip_forward",
                    "1\n",
                )
            },
        },
        Clause {
            group: "misc",
            section: "config.md#hostname",
            text: "hostname is set in the uts namespace",
            by: LC,
            check: |rt| expect(rt, &[("/hostname", json!("cc-host"))], "hostname", "cc-host\n"),
        },
        Clause {
            group: "misc",
            section: "config.md#domainname",
            text: "domainname is set in the uts namespace",
            by: LC,
            check: |rt| {
                expect(
                    rt,
                    &[("/domainname", json!("cc-domain"))],
                    "cat /proc/sys/kernel/domainname",
                    "cc-domain\n",
                )
            },
        },
        Clause {
            group: "process",
            section: "config.md#process",
            text: "terminal: the pty master goes to --console-socket and the process's stdio is the pty",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/terminal", json!(true));
                b.set("/process/args", json!(["sh", "-c", "tty; echo hello-tty"]));
                let sock = b.dir.path().join("console.sock");
                let listener = UnixListener::bind(&sock).map_err(|e| e.to_string())?;
                let receiver = std::thread::spawn(move || -> Result<OwnedFd, String> {
                    let s = accept(&listener)?;
                    let (_, mut fds) = recv_fds(&s)?;
                    fds.pop().ok_or_else(|| "no pty fd".to_string())
                });
                let id = new_id();
                let o = rt.out(&[
                    "create",
                    "--bundle",
                    b.path(),
                    "--console-socket",
                    sock.to_str().unwrap(),
                    &id,
                ]);
                if !o.status.success() {
                    let _ = receiver.join();
                    rt.delete(&id);
                    return Err(format!("create: {}", String::from_utf8_lossy(&o.stderr)));
                }
                let master = receiver.join().unwrap()?;
                rt.ok(&["start", &id])?;
                let mut f = std::fs::File::from(master);
                let mut out = Vec::new();
                let _ = std::io::Read::read_to_end(&mut f, &mut out);
                rt.delete(&id);
                let out = String::from_utf8_lossy(&out);
                ensure!(
                    out.contains("/dev/pts/") && out.contains("hello-tty"),
                    "pty output {out:?}"
                );
                Ok(())
            },
        },
    ]
}
