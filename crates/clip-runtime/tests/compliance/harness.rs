//! Runtimes under test, bundles, and running containers through each
//! runtime's own command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use serde_json::{json, Value};

/// A runtime driven through its runc-compatible command line.
pub struct Rt {
    pub name: &'static str,
    bin: PathBuf,
    pub root: tempfile::TempDir,
}

impl Rt {
    pub fn all() -> Vec<Rt> {
        vec![
            Rt::new("clip-runtime", env!("CARGO_BIN_EXE_clip-runtime")),
            Rt::new("runc", "runc"),
            Rt::new("crun", "crun"),
        ]
    }

    fn new(name: &'static str, bin: &str) -> Rt {
        Rt {
            name,
            bin: bin.into(),
            root: tempfile::tempdir().unwrap(),
        }
    }

    /// `RUNTIME --root ROOT ARGS...`. crun refuses this host's hybrid
    /// cgroup layout; it runs in a private mount namespace without the
    /// cgroup2 mount (NOTES.md).
    /// Every command is bounded by `timeout`, so a hang is a failure.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "60"]);
        if self.name == "crun" {
            c.args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
                .arg("umount -l /sys/fs/cgroup/unified 2>/dev/null; exec \"$0\" \"$@\"")
                .arg(&self.bin);
        } else {
            c.arg(&self.bin);
        }
        c.arg("--root").arg(self.root.path()).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a command; its output. The stdio of `create` stays with the
    /// container's process, so it gets no pipes (reading them would wait
    /// for the container to exit): stdout goes to /dev/null, stderr to a
    /// file read back here.
    pub fn out(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        if args.first() == Some(&"create") {
            let err = tempfile::NamedTempFile::new().unwrap();
            c.stdout(Stdio::null()).stderr(err.reopen().unwrap());
            let status = c.status().unwrap();
            return Output {
                status,
                stdout: Vec::new(),
                stderr: std::fs::read(err.path()).unwrap_or_default(),
            };
        }
        c.output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> Result<Output, String> {
        let o = self.out(args);
        if o.status.success() {
            Ok(o)
        } else {
            Err(format!(
                "{args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// The container's state JSON, or None if the runtime says it has none.
    pub fn state(&self, id: &str) -> Option<Value> {
        let o = self.out(&["state", id]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap_or(Value::Null))
    }

    /// Runs the bundle in the foreground; (exit code, stdout, stderr).
    pub fn run(&self, b: &Bundle) -> (i32, String, String) {
        let id = new_id();
        let o = self.out(&["run", "--bundle", b.path(), &id]);
        let _ = self.out(&["delete", "--force", &id]);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Runs `script` with sh; its stdout, or an error with what went wrong.
    pub fn sh(&self, b: &mut Bundle, script: &str) -> Result<String, String> {
        b.set("/process/args", json!(["sh", "-c", script]));
        let (code, out, err) = self.run(b);
        if code != 0 {
            return Err(format!("exit {code}: {} {}", out.trim(), err.trim()));
        }
        Ok(out)
    }

    pub fn delete(&self, id: &str) {
        let _ = self.out(&["kill", id, "KILL"]);
        let _ = self.out(&["delete", "--force", id]);
    }
}

pub fn new_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("cc-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A busybox root filesystem shared by all bundles (they mount it
/// read-only unless a clause says otherwise).
pub fn rootfs() -> &'static Path {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        // Built once under a private name and renamed into place, so runs
        // share one copy and a concurrent run never sees half of it.
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let done = tmp.join("compliance-rootfs");
        if done.join("etc/group").exists() {
            return done;
        }
        let dir = tmp.join(format!("compliance-rootfs.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "out", "root"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).unwrap();
        let list = Command::new("/usr/bin/busybox").arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
            }
        }
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
        if std::fs::rename(&dir, &done).is_err() {
            // Another run got there first.
            let _ = std::fs::remove_dir_all(&dir);
        }
        done
    })
}

/// A bundle: config.json from `runc spec` (the reference defaults), with
/// a shared busybox rootfs and a host directory at /out.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub out: PathBuf,
    pub config: Value,
}

impl Bundle {
    pub fn new() -> Bundle {
        static BASE: OnceLock<Value> = OnceLock::new();
        let base = BASE.get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let o = Command::new("runc")
                .args(["spec", "--bundle"])
                .arg(d.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "runc spec");
            serde_json::from_slice(&std::fs::read(d.path().join("config.json")).unwrap()).unwrap()
        });
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut b = Bundle {
            dir,
            out: out.clone(),
            config: base.clone(),
        };
        b.set("/root/path", json!(rootfs()));
        b.set("/process/terminal", json!(false));
        b.add_mount(json!({"destination": "/out", "type": "bind", "source": out, "options": ["rbind", "rw"]}));
        b
    }

    pub fn path(&self) -> &str {
        self.write();
        self.dir.path().to_str().unwrap()
    }

    pub fn write(&self) {
        std::fs::write(
            self.dir.path().join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }

    /// Sets a JSON pointer path, creating objects on the way.
    pub fn set(&mut self, pointer: &str, v: Value) {
        let mut cur = &mut self.config;
        let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
        for (i, p) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                match cur {
                    Value::Object(m) => {
                        m.insert(p.to_string(), v);
                    }
                    Value::Array(a) => {
                        let idx: usize = p.parse().unwrap();
                        a[idx] = v;
                    }
                    _ => panic!("{pointer}: not a container"),
                }
                return;
            }
            if cur.get(*p).is_none() {
                cur.as_object_mut().unwrap().insert(p.to_string(), json!({}));
            }
            cur = cur.get_mut(*p).unwrap();
        }
    }

    pub fn add_mount(&mut self, m: Value) {
        self.config["mounts"].as_array_mut().unwrap().push(m);
    }

    pub fn push(&mut self, pointer: &str, v: Value) {
        if self.config.pointer(pointer).is_none() {
            self.set(pointer, json!([]));
        }
        self.config
            .pointer_mut(pointer)
            .unwrap()
            .as_array_mut()
            .unwrap()
            .push(v);
    }

    pub fn out_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_default()
    }
}
