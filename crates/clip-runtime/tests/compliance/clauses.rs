//! The clauses: each a MUST or REQUIRED of the runtime spec (section
//! named), checked through the runtime's command line as root.

use serde_json::json;

use crate::harness::{new_id, Bundle, Rt};

pub struct Clause {
    pub group: &'static str,
    pub section: &'static str,
    pub text: &'static str,
    /// Where clip-runtime handles it.
    pub by: &'static str,
    pub check: fn(&Rt) -> Result<(), String>,
}

#[macro_export]
macro_rules! ensure {
    ($c:expr, $($m:tt)+) => {
        if !$c {
            return Err(format!($($m)+));
        }
    };
}

const LC: &str = "libcontainer";
const CLI: &str = "clip-runtime CLI";

/// A container created (not started) from `b`, deleted on drop.
struct Created<'a> {
    rt: &'a Rt,
    id: String,
}

impl<'a> Created<'a> {
    fn new(rt: &'a Rt, b: &Bundle) -> Result<Created<'a>, String> {
        let id = new_id();
        rt.ok(&["create", "--bundle", b.path(), &id])?;
        Ok(Created { rt, id })
    }

    /// Created and started, and seen running.
    fn running(rt: &'a Rt, b: &Bundle) -> Result<Created<'a>, String> {
        let c = Created::new(rt, b)?;
        rt.ok(&["start", &c.id])?;
        c.wait_status("running")?;
        Ok(c)
    }

    fn status(&self) -> String {
        self.rt
            .state(&self.id)
            .and_then(|s| s["status"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn wait_status(&self, want: &str) -> Result<(), String> {
        for _ in 0..200 {
            if self.status() == want {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(format!("status stayed {:?}, wanted {want}", self.status()))
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        self.rt.delete(&self.id);
    }
}

/// `BUNDLE/src` with a tmpfs mounted at `src/sub`, unmounted on drop: a
/// bind-mount source with a submount.
struct Submount(std::path::PathBuf);

impl Submount {
    fn new(b: &Bundle) -> Result<Submount, String> {
        let sub = b.dir.path().join("src/sub");
        std::fs::create_dir_all(&sub).unwrap();
        let m = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&sub)
            .status()
            .unwrap();
        ensure!(m.success(), "mount tmpfs");
        Ok(Submount(sub))
    }

    fn source(&self) -> std::path::PathBuf {
        self.0.parent().unwrap().to_path_buf()
    }
}

impl Drop for Submount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Runs `script` in a bundle with `sets` applied; its stdout must be `want`.
pub fn expect(rt: &Rt, sets: &[(&str, serde_json::Value)], script: &str, want: &str) -> Result<(), String> {
    let mut b = Bundle::new();
    for (pointer, v) in sets {
        b.set(pointer, v.clone());
    }
    let out = rt.sh(&mut b, script)?;
    ensure!(out == want, "got {out:?}, want {want:?}");
    Ok(())
}

fn sleeper() -> Bundle {
    let mut b = Bundle::new();
    b.set("/process/args", json!(["sleep", "60"]));
    b
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// A `/proc/self/status` field.
fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim_start_matches(':').trim()))
        .unwrap_or("")
}

pub fn all() -> Vec<Clause> {
    vec![
        // --- lifecycle (runtime.md)
        Clause {
            group: "lifecycle",
            section: "runtime.md#state",
            text: "state of an unknown id is an error",
            by: CLI,
            check: |rt| {
                ensure!(rt.state("no-such-container").is_none(), "state succeeded");
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#create",
            text: "create leaves the container `created` with ociVersion, id, pid, bundle in its state",
            by: LC,
            check: |rt| {
                let b = sleeper();
                let c = Created::new(rt, &b)?;
                let s = rt.state(&c.id).ok_or("no state")?;
                ensure!(s["status"] == "created", "status {}", s["status"]);
                ensure!(s["id"] == c.id.as_str(), "id {}", s["id"]);
                ensure!(s["pid"].as_i64().unwrap_or(0) > 0, "pid {}", s["pid"]);
                ensure!(s["ociVersion"].as_str().is_some_and(|v| !v.is_empty()), "no ociVersion");
                let bundle = std::fs::canonicalize(b.dir.path()).unwrap();
                ensure!(s["bundle"] == bundle.to_str().unwrap(), "bundle {}", s["bundle"]);
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#create",
            text: "the user's process does not run before start",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/args", json!(["sh", "-c", "echo ran > /out/ran"]));
                let c = Created::new(rt, &b)?;
                std::thread::sleep(std::time::Duration::from_millis(200));
                ensure!(b.out_file("ran").is_empty(), "process ran at create");
                rt.ok(&["start", &c.id])?;
                c.wait_status("stopped")?;
                ensure!(b.out_file("ran") == "ran\n", "process did not run at start");
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#create",
            text: "create with an id in use is an error and leaves the first container alone",
            by: CLI,
            check: |rt| {
                let b = sleeper();
                let c = Created::new(rt, &b)?;
                let o = rt.out(&["create", "--bundle", b.path(), &c.id]);
                ensure!(!o.status.success(), "second create succeeded");
                ensure!(c.status() == "created", "first is now {}", c.status());
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#start",
            text: "start of a running or stopped container is an error",
            by: CLI,
            check: |rt| {
                let b = sleeper();
                let c = Created::running(rt, &b)?;
                ensure!(
                    !rt.out(&["start", &c.id]).status.success(),
                    "start of running succeeded"
                );
                rt.ok(&["kill", &c.id, "KILL"])?;
                c.wait_status("stopped")?;
                ensure!(
                    !rt.out(&["start", &c.id]).status.success(),
                    "start of stopped succeeded"
                );
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#kill",
            text: "kill sends the signal to the container's process; it then stops",
            by: LC,
            check: |rt| {
                let b = sleeper();
                let c = Created::running(rt, &b)?;
                rt.ok(&["kill", &c.id, "SIGKILL"])?;
                c.wait_status("stopped")
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#kill",
            text: "kill of a stopped container is an error",
            by: CLI,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/args", json!(["true"]));
                let c = Created::new(rt, &b)?;
                rt.ok(&["start", &c.id])?;
                c.wait_status("stopped")?;
                ensure!(!rt.out(&["kill", &c.id, "TERM"]).status.success(), "kill succeeded");
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#delete",
            text: "delete of a running container (without force) is an error",
            by: CLI,
            check: |rt| {
                let b = sleeper();
                let c = Created::running(rt, &b)?;
                ensure!(!rt.out(&["delete", &c.id]).status.success(), "delete succeeded");
                ensure!(c.status() == "running", "now {}", c.status());
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#delete",
            text: "delete removes the container: its state is gone, its cgroup is gone",
            by: LC,
            check: |rt| {
                let b = sleeper();
                let id = new_id();
                rt.ok(&["create", "--bundle", b.path(), &id])?;
                let pid = rt.state(&id).ok_or("no state")?["pid"].as_i64().unwrap_or(0);
                let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                let pids_cg = cg.lines().find_map(|l| l.split_once(":pids:").map(|x| x.1.to_string()));
                rt.ok(&["kill", &id, "KILL"])?;
                for _ in 0..100 {
                    if rt.state(&id).is_some_and(|s| s["status"] == "stopped") {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                rt.ok(&["delete", &id])?;
                ensure!(rt.state(&id).is_none(), "state still answers");
                if let Some(p) = pids_cg.filter(|p| p != "/") {
                    let dir = format!("/sys/fs/cgroup/pids{p}");
                    ensure!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
                }
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#delete",
            text: "delete removes only what create made: the bundle, rootfs and bind-mount sources stay",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/args", json!(["sh", "-c", "echo kept > /out/kept"]));
                let (code, _, err) = rt.run(&b);
                ensure!(code == 0, "run: {err}");
                ensure!(b.out_file("kept") == "kept\n", "bind-mount source lost its file");
                ensure!(b.dir.path().join("config.json").exists(), "config.json gone");
                ensure!(crate::harness::rootfs().join("bin/busybox").exists(), "rootfs damaged");
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#create",
            text: "a failed create (missing rootfs) is an error and leaves no state behind",
            by: "clip-runtime (cleanup on failure)",
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/root/path", json!("/nonexistent-rootfs"));
                let id = new_id();
                let o = rt.out(&["create", "--bundle", b.path(), &id]);
                ensure!(!o.status.success(), "create succeeded");
                ensure!(rt.state(&id).is_none(), "state exists after failed create");
                ensure!(!rt.root.path().join(&id).exists(), "state dir left in root");
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#state",
            text: "annotations from config.json appear in state",
            by: LC,
            check: |rt| {
                let mut b = sleeper();
                b.set("/annotations", json!({"org.clip.test": "yes"}));
                let c = Created::new(rt, &b)?;
                let s = rt.state(&c.id).ok_or("no state")?;
                ensure!(
                    s["annotations"]["org.clip.test"] == "yes",
                    "annotations {}",
                    s["annotations"]
                );
                Ok(())
            },
        },
        Clause {
            group: "lifecycle",
            section: "runtime.md#operations",
            text: "the process's exit code is run's exit code",
            by: CLI,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/args", json!(["sh", "-c", "exit 7"]));
                let (code, _, err) = rt.run(&b);
                ensure!(code == 7, "exit {code}: {err}");
                Ok(())
            },
        },
        // --- hooks (config.md#posix-platform-hooks)
        Clause {
            group: "hooks",
            section: "config.md#lifecycle-hooks",
            text: "hooks run in order: createRuntime, createContainer, startContainer, poststart, poststop",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                let log = b.out.join("hooks");
                let host = |name: &str| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} >> {}", log.display())]});
                b.push("/hooks/createRuntime", host("createRuntime"));
                b.push("/hooks/poststart", host("poststart"));
                b.push("/hooks/poststop", host("poststop"));
                // These two run in the container's namespaces.
                b.push("/hooks/createContainer", json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo createContainer >> {}", log.display())]}));
                b.push(
                    "/hooks/startContainer",
                    json!({"path": "/bin/sh", "args": ["sh", "-c", "echo startContainer >> /out/hooks"]}),
                );
                b.set("/process/args", json!(["sh", "-c", "echo process >> /out/hooks"]));
                let (code, _, err) = rt.run(&b);
                ensure!(code == 0, "run: {err}");
                let got = b.out_file("hooks");
                let got = lines(&got);
                ensure!(
                    got == [
                        "createRuntime",
                        "createContainer",
                        "startContainer",
                        "process",
                        "poststart",
                        "poststop"
                    ] || got
                        == [
                            "createRuntime",
                            "createContainer",
                            "startContainer",
                            "poststart",
                            "process",
                            "poststop"
                        ],
                    "order {got:?}"
                );
                Ok(())
            },
        },
        Clause {
            group: "hooks",
            section: "config.md#posix-platform-hooks",
            text: "hooks get the container's state on stdin",
            by: LC,
            check: |rt| {
                let mut b = sleeper();
                let f = b.out.join("state.json");
                b.push(
                    "/hooks/createRuntime",
                    json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", f.display())]}),
                );
                let c = Created::new(rt, &b)?;
                let s: serde_json::Value =
                    serde_json::from_str(&b.out_file("state.json")).map_err(|e| format!("hook stdin: {e}"))?;
                ensure!(s["id"] == c.id.as_str(), "id {}", s["id"]);
                ensure!(s["pid"].as_i64().unwrap_or(0) > 0, "pid {}", s["pid"]);
                ensure!(s["bundle"].as_str().is_some(), "no bundle");
                Ok(())
            },
        },
        Clause {
            group: "hooks",
            section: "config.md#posix-platform-hooks",
            text: "hooks run with their args and env",
            by: LC,
            check: |rt| {
                let mut b = sleeper();
                let f = b.out.join("env");
                b.push(
                    "/hooks/createRuntime",
                    json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo \"$0 $HOOKVAR\" > {}", f.display()), "arg0"], "env": ["HOOKVAR=hookval"]}),
                );
                let _c = Created::new(rt, &b)?;
                ensure!(b.out_file("env") == "arg0 hookval\n", "got {:?}", b.out_file("env"));
                Ok(())
            },
        },
        Clause {
            group: "hooks",
            section: "config.md#createruntime-hooks",
            text: "a failing createRuntime hook fails create and leaves nothing",
            by: LC,
            check: |rt| {
                let mut b = sleeper();
                b.push("/hooks/createRuntime", json!({"path": "/bin/false", "args": ["false"]}));
                let id = new_id();
                let o = rt.out(&["create", "--bundle", b.path(), &id]);
                let ok = !o.status.success() && rt.state(&id).is_none();
                rt.delete(&id);
                ensure!(ok, "create succeeded or left state");
                Ok(())
            },
        },
        Clause {
            group: "hooks",
            section: "config.md#poststop",
            text: "a failing poststop hook does not fail delete",
            by: "clip-runtime (finishes delete when libcontainer stops at a failed poststop hook)",
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/args", json!(["true"]));
                b.push("/hooks/poststop", json!({"path": "/bin/false", "args": ["false"]}));
                let c = Created::new(rt, &b)?;
                rt.ok(&["start", &c.id])?;
                c.wait_status("stopped")?;
                rt.ok(&["delete", &c.id])?;
                ensure!(rt.state(&c.id).is_none(), "state remains");
                Ok(())
            },
        },
        // --- process (config.md#process)
        Clause {
            group: "process",
            section: "config.md#process",
            text: "args and env are the process's",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.push("/process/env", json!("GREETING=hello world"));
                b.set(
                    "/process/args",
                    json!(["sh", "-c", "echo \"$0|$1|$GREETING\"", "zero", "one"]),
                );
                let (code, out, err) = rt.run(&b);
                ensure!(
                    code == 0 && out == "zero|one|hello world\n",
                    "exit {code} {out:?} {err}"
                );
                Ok(())
            },
        },
        Clause {
            group: "process",
            section: "config.md#process",
            text: "cwd is the working directory",
            by: LC,
            check: |rt| expect(rt, &[("/process/cwd", json!("/etc"))], "pwd", "/etc\n"),
        },
        Clause {
            group: "process",
            section: "config.md#user",
            text: "user: uid, gid and additionalGids",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set(
                    "/process/user",
                    json!({"uid": 1000, "gid": 1000, "additionalGids": [44, 29]}),
                );
                let out = rt.sh(&mut b, "cat /proc/self/status")?;
                ensure!(
                    status_field(&out, "Uid").split_whitespace().all(|u| u == "1000"),
                    "Uid {}",
                    status_field(&out, "Uid")
                );
                ensure!(
                    status_field(&out, "Gid").split_whitespace().all(|g| g == "1000"),
                    "Gid {}",
                    status_field(&out, "Gid")
                );
                let mut groups: Vec<&str> = status_field(&out, "Groups").split_whitespace().collect();
                groups.sort();
                ensure!(groups.contains(&"29") && groups.contains(&"44"), "Groups {groups:?}");
                Ok(())
            },
        },
        Clause {
            group: "process",
            section: "config.md#linux-process",
            text: "capabilities: bounding, effective, permitted and ambient sets",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                // CAP_KILL (5) and CAP_NET_BIND_SERVICE (10) only.
                let caps = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
                for set in ["bounding", "effective", "permitted", "ambient", "inheritable"] {
                    b.set(&format!("/process/capabilities/{set}"), caps.clone());
                }
                let out = rt.sh(&mut b, "cat /proc/self/status")?;
                let want = "0000000000000420";
                for k in ["CapBnd", "CapEff", "CapPrm", "CapAmb"] {
                    ensure!(status_field(&out, k) == want, "{k} {}", status_field(&out, k));
                }
                Ok(())
            },
        },
        Clause {
            group: "process",
            section: "config.md#posix-process",
            text: "rlimits are set",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set(
                    "/process/rlimits",
                    json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]),
                );
                let out = rt.sh(&mut b, "ulimit -Sn; ulimit -Hn")?;
                ensure!(lines(&out) == ["321", "654"], "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "process",
            section: "config.md#linux-process",
            text: "noNewPrivileges sets no_new_privs",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/process/noNewPrivileges", json!(true));
                let out = rt.sh(&mut b, "cat /proc/self/status")?;
                ensure!(
                    status_field(&out, "NoNewPrivs") == "1",
                    "NoNewPrivs {}",
                    status_field(&out, "NoNewPrivs")
                );
                b.set("/process/noNewPrivileges", json!(false));
                let out = rt.sh(&mut b, "cat /proc/self/status")?;
                ensure!(
                    status_field(&out, "NoNewPrivs") == "0",
                    "NoNewPrivs {} when false",
                    status_field(&out, "NoNewPrivs")
                );
                Ok(())
            },
        },
        Clause {
            group: "process",
            section: "config.md#linux-process",
            text: "oomScoreAdj is set",
            by: LC,
            check: |rt| {
                expect(
                    rt,
                    &[("/process/oomScoreAdj", json!(123))],
                    "cat /proc/self/oom_score_adj",
                    "123\n",
                )
            },
        },
        // --- filesystem
        Clause {
            group: "filesystem",
            section: "config.md#root",
            text: "root.readonly makes the root filesystem read-only",
            by: LC,
            check: |rt| {
                expect(
                    rt,
                    &[("/root/readonly", json!(true))],
                    "touch /rootfile 2>/dev/null && echo writable || echo readonly",
                    "readonly\n",
                )
            },
        },
        Clause {
            group: "filesystem",
            section: "config-linux.md#masked-paths",
            text: "maskedPaths are masked (files read empty, directories empty)",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set(
                    "/linux/maskedPaths",
                    json!(["/proc/kcore", "/etc/passwd", "/proc/scsi"]),
                );
                let out = rt.sh(&mut b, "wc -c < /etc/passwd; ls /proc/scsi 2>/dev/null | wc -l")?;
                ensure!(lines(&out) == ["0", "0"], "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "filesystem",
            section: "config-linux.md#readonly-paths",
            text: "readonlyPaths are read-only",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/linux/readonlyPaths", json!(["/proc/sys", "/out"]));
                let out = rt.sh(&mut b, "touch /out/x 2>/dev/null && echo rw || echo ro; echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo rw || echo ro")?;
                ensure!(lines(&out) == ["ro", "ro"], "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "filesystem",
            section: "config.md#mounts",
            text: "mounts: type, source and options (tmpfs size and mode; ro bind)",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.add_mount(json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m", "mode=0710", "nosuid"]}));
                b.add_mount(json!({"destination": "/robind", "type": "bind", "source": b.out.clone(), "options": ["bind", "ro"]}));
                let out = rt.sh(&mut b, "stat -c %a /scratch; grep ' /scratch ' /proc/self/mountinfo; touch /robind/x 2>/dev/null && echo rw || echo ro")?;
                let l = lines(&out);
                ensure!(l.len() == 3, "got {out:?}");
                ensure!(l[0] == "710", "mode {}", l[0]);
                ensure!(l[1].contains("nosuid") && l[1].contains("size=1024k"), "mount {}", l[1]);
                ensure!(l[2] == "ro", "bind {}", l[2]);
                Ok(())
            },
        },
        Clause {
            group: "filesystem",
            section: "config.md#mounts",
            text: "rbind is recursive: submounts of the source appear",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                let sub = Submount::new(&b)?;
                std::fs::write(sub.0.join("f"), "in submount").unwrap();
                b.add_mount(
                    json!({"destination": "/rb", "type": "bind", "source": sub.source(), "options": ["rbind"]}),
                );
                let out = rt.sh(&mut b, "cat /rb/sub/f")?;
                ensure!(out == "in submount", "got {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "filesystem",
            section: "config.md#mounts",
            text: "rro makes a bind mount and its submounts read-only (recursive option)",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                let sub = Submount::new(&b)?;
                b.add_mount(
                    json!({"destination": "/rb", "type": "bind", "source": sub.source(), "options": ["rbind", "rro"]}),
                );
                let out = rt.sh(&mut b, "touch /rb/sub/x 2>/dev/null && echo rw || echo ro")?;
                ensure!(out == "ro\n", "submount {out:?}");
                Ok(())
            },
        },
        Clause {
            group: "filesystem",
            section: "config-linux.md#rootfs-mount-propagation",
            text: "rootfsPropagation shared: the root mount is shared",
            by: LC,
            check: |rt| {
                let mut b = Bundle::new();
                b.set("/linux/rootfsPropagation", json!("shared"));
                let out = rt.sh(&mut b, "awk '$5 == \"/\"' /proc/self/mountinfo")?;
                ensure!(out.contains(" shared:"), "root mount {out:?}");
                Ok(())
            },
        },
    ]
}
