//! Walks an image's hints from a container's command, as the dynamic
//! loader and the Python interpreter will, and lists the bytes they will
//! read, in the order they will read them.

use std::collections::HashSet;

use clip_format::{Data, Index, Kind};

use crate::{Fact, Hints};

/// The process a container runs.
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub args: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    pub cwd: String,
}

impl Process {
    /// The process a container of the image with `config` (its JSON)
    /// runs, given the caller's `cmd`, `entrypoint`, extra `env` and
    /// `workdir`, combined as Docker does.
    pub fn of_image(
        config: &[u8],
        cmd: &[String],
        entrypoint: Option<&str>,
        env: &[String],
        workdir: Option<&str>,
    ) -> Self {
        let c: serde_json::Value = serde_json::from_slice(config).unwrap_or_default();
        let c = &c["config"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let mut args = match entrypoint {
            Some("") => Vec::new(),
            Some(e) => vec![e.to_string()],
            None => strings(&c["Entrypoint"]),
        };
        if !cmd.is_empty() {
            args.extend(cmd.iter().cloned());
        } else if entrypoint.is_none() {
            args.extend(strings(&c["Cmd"]));
        }
        let mut all_env = strings(&c["Env"]);
        all_env.extend(env.iter().cloned());
        Process {
            args,
            env: all_env,
            cwd: workdir
                .map(str::to_string)
                .or_else(|| c["WorkingDir"].as_str().map(str::to_string))
                .unwrap_or_default(),
        }
    }
}

/// A read the guess expects: (layer, first byte in the layer's
/// uncompressed stream, length).
pub type Read = (u32, u64, u64);

/// An object this small is taken whole: its code is read too, and a
/// fetch of a unit costs about the same whatever part of it is used.
const WHOLE_ELF: u64 = 16 << 20;
/// Of a larger object, its start (headers, and the first code).
const ELF_HEAD: u64 = 2 << 20;
/// The most a guess names, in bytes: a guess is fetched ahead of the
/// container, and a wrong one must not flood the node.
const MAX_BYTES: u64 = 2 << 30;
/// The deepest chain of imports or libraries followed.
const MAX_DEPTH: usize = 200;
/// Files nearly every process start reads (user lookup, the loader's
/// cache, time zone, locale, character sets).
const START_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/lib/locale/locale-archive",
    "/usr/lib/locale/C.utf8/LC_CTYPE",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
    "/usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache",
];
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

struct Walk<'a> {
    index: &'a Index,
    hints: &'a Hints,
    out: &'a mut Vec<Read>,
    seen: HashSet<Read>,
    bytes: u64,
    objects: HashSet<u64>,
    modules: HashSet<String>,
    py: Option<Python>,
    /// Where each module name was found (or not), for the many names
    /// tried more than once.
    found: std::cell::RefCell<std::collections::HashMap<String, Option<Module>>>,
}

/// Where an interpreter finds modules.
struct Python {
    /// `cpython-311`.
    tag: String,
    path: Vec<String>,
}

#[derive(Clone)]
enum Module {
    Package(String),
    Source(String),
    Extension(String),
}

impl Module {
    fn file(&self) -> &str {
        match self {
            Module::Package(f) | Module::Source(f) | Module::Extension(f) => f,
        }
    }
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl<'a> Walk<'a> {
    /// A regular file's inode, symlinks followed.
    fn file(&self, path: &str) -> Option<u64> {
        let ino = self.index.resolve_follow(path.as_bytes())?;
        (self.index.node(ino)?.kind == Kind::File).then_some(ino)
    }

    fn is_dir(&self, path: &str) -> bool {
        self.index
            .resolve_follow(path.as_bytes())
            .and_then(|i| self.index.node(i))
            .is_some_and(|n| n.kind == Kind::Dir)
    }

    /// The file's facts, and where its bytes are.
    fn place(&self, ino: u64) -> Option<(u32, u64, u64)> {
        let n = self.index.node(ino)?;
        match n.data {
            Data::Contiguous { layer, offset } => Some((layer, offset, n.size)),
            _ => None,
        }
    }

    fn fact(&self, ino: u64) -> Option<&'a Fact> {
        let (layer, offset, _) = self.place(ino)?;
        self.hints.files.get(&(layer, offset))
    }

    /// Adds `len` bytes at `off` of file `ino`.
    fn read(&mut self, ino: u64, off: u64, len: u64) {
        let Some((layer, start, size)) = self.place(ino) else {
            return;
        };
        let len = len.min(size.saturating_sub(off));
        if len == 0 || self.bytes + len > MAX_BYTES {
            return;
        }
        let r = (layer, start + off, len);
        if self.seen.insert(r) {
            self.bytes += len;
            self.out.push(r);
        }
    }

    fn read_path(&mut self, path: &str) {
        if let Some(ino) = self.file(path) {
            self.read(ino, 0, u64::MAX);
        }
    }

    /// An ELF object and, depth first, the libraries it needs, found as
    /// the loader finds them.
    fn object(&mut self, ino: u64, dir: &str, inherited: &[String], depth: usize) {
        if depth > MAX_DEPTH || !self.objects.insert(ino) {
            return;
        }
        let Some((_, _, size)) = self.place(ino) else { return };
        let Some(Fact::Elf(f)) = self.fact(ino) else {
            self.read(ino, 0, u64::MAX);
            return;
        };
        if size <= WHOLE_ELF {
            self.read(ino, 0, u64::MAX);
        } else {
            self.read(ino, 0, ELF_HEAD);
            for &(o, l) in f.ranges.iter().filter(|&&(o, l)| o.saturating_add(l) > ELF_HEAD) {
                self.read(ino, o, l);
            }
        }
        if let Some(interp) = &f.interp {
            if let Some(i) = self.file(interp) {
                let d = parent(interp).to_string();
                self.object(i, &d, &[], depth + 1);
            }
        }
        let own: Vec<String> = f
            .runpath
            .iter()
            .map(|p| p.replace("${ORIGIN}", dir).replace("$ORIGIN", dir))
            .collect();
        // DT_RPATH reaches the object's dependencies too; the loader also
        // finds a library already loaded by its name, which a search in the
        // loading chain's directories approximates.
        let mut passed: Vec<String> = own.clone();
        passed.extend(inherited.iter().cloned());
        for n in &f.needed {
            let found = if n.contains('/') {
                self.file(n).map(|i| (i, n.clone()))
            } else {
                own.iter()
                    .chain(inherited)
                    .map(String::as_str)
                    .chain([dir])
                    .chain(LIB_DIRS.iter().copied())
                    .map(|d| join(d, n))
                    .find_map(|p| self.file(&p).map(|i| (i, p)))
            };
            if let Some((i, p)) = found {
                let d = self.canonical_dir(&p);
                self.object(i, &d, &passed, depth + 1);
            }
        }
    }

    /// The directory a path's file really lies in ($ORIGIN of an object
    /// reached through a symlink is its target's directory).
    fn canonical_dir(&self, path: &str) -> String {
        let Some(ino) = self.index.resolve_follow(path.as_bytes()) else {
            return parent(path).to_string();
        };
        let Some(n) = self.index.node(ino) else {
            return parent(path).to_string();
        };
        self.index
            .dir_path(n.parent)
            .map(|p| format!("/{}", String::from_utf8_lossy(&p)))
            .unwrap_or_else(|| parent(path).to_string())
    }

    fn program(&mut self, path: &str) {
        if let Some(ino) = self.file(path) {
            let d = self.canonical_dir(path);
            self.object(ino, &d, &[], 0);
        }
    }

    // ---- Python ----

    fn find_in(&self, dirs: &[String], name: &str) -> Option<Module> {
        let py = self.py.as_ref()?;
        for d in dirs {
            let pkg = join(d, name);
            let init = join(&pkg, "__init__.py");
            if self.file(&init).is_some() {
                return Some(Module::Package(init));
            }
            let src = join(d, &format!("{name}.py"));
            if self.file(&src).is_some() {
                return Some(Module::Source(src));
            }
            for suffix in [
                format!(".{}-x86_64-linux-gnu.so", py.tag),
                format!(".{}-aarch64-linux-gnu.so", py.tag),
                ".abi3.so".to_string(),
                ".so".to_string(),
            ] {
                let ext = join(d, &format!("{name}{suffix}"));
                if self.file(&ext).is_some() {
                    return Some(Module::Extension(ext));
                }
            }
        }
        None
    }

    fn find(&self, name: &str) -> Option<Module> {
        if let Some(m) = self.found.borrow().get(name) {
            return m.clone();
        }
        let m = self.find_uncached(name);
        self.found.borrow_mut().insert(name.to_string(), m.clone());
        m
    }

    fn find_uncached(&self, name: &str) -> Option<Module> {
        match name.rsplit_once('.') {
            None => self.find_in(&self.py.as_ref()?.path, name),
            Some((pkg, last)) => match self.find(pkg)? {
                Module::Package(init) => self.find_in(&[parent(&init).to_string()], last),
                _ => None,
            },
        }
    }

    fn module(&mut self, name: &str, depth: usize) {
        if depth > MAX_DEPTH || name.is_empty() || self.modules.contains(name) {
            return;
        }
        self.modules.insert(name.to_string());
        if let Some((pkg, _)) = name.rsplit_once('.') {
            self.module(pkg, depth + 1);
        }
        let Some(m) = self.find(name) else { return };
        let file = m.file().to_string();
        let Some(ino) = self.file(&file) else { return };
        if let Module::Extension(_) = m {
            let d = self.canonical_dir(&file);
            self.object(ino, &d, &[], depth + 1);
            if let Some(Fact::Elf(f)) = self.fact(ino) {
                for n in &f.names {
                    if n != name && !self.modules.contains(n) && self.find(n).is_some() {
                        self.module(n, depth + 1);
                    }
                }
            }
            return;
        }
        // Python reads the compiled module first, and the source only when
        // the compiled one is stale.
        let tag = self.py.as_ref().map(|p| p.tag.clone()).unwrap_or_default();
        let base = file.rsplit('/').next().unwrap_or(&file).trim_end_matches(".py");
        let pyc = join(&join(parent(&file), "__pycache__"), &format!("{base}.{tag}.pyc"));
        let fresh = match self.file(&pyc) {
            Some(c) => {
                self.read(c, 0, u64::MAX);
                let src = self.index.node(ino);
                matches!((self.fact(c), src), (Some(Fact::Pyc { mtime, size }), Some(s))
                    if *mtime == s.mtime as u32 && *size == s.size as u32)
            }
            None => false,
        };
        if !fresh {
            self.read(ino, 0, u64::MAX);
        }
        let package = match m {
            Module::Package(_) => name.to_string(),
            _ => name.rsplit_once('.').map_or(String::new(), |(p, _)| p.to_string()),
        };
        self.imports_of(ino, &package, depth);
    }

    /// Follows the imports of the source at `ino`, run as part of
    /// `package`.
    fn imports_of(&mut self, ino: u64, package: &str, depth: usize) {
        let Some(Fact::Python { imports, .. }) = self.fact(ino) else {
            return;
        };
        for i in imports {
            let full = if i.level == 0 {
                i.module.clone()
            } else {
                let mut base: Vec<&str> = package.split('.').filter(|p| !p.is_empty()).collect();
                if i.level as usize - 1 > base.len() {
                    continue;
                }
                base.truncate(base.len() - (i.level as usize - 1));
                if !i.module.is_empty() {
                    base.push(&i.module);
                }
                base.join(".")
            };
            if full.is_empty() {
                continue;
            }
            self.module(&full, depth + 1);
            for n in &i.names {
                let sub = format!("{full}.{n}");
                if !self.modules.contains(&sub) && self.find(&sub).is_some() {
                    self.module(&sub, depth + 1);
                }
            }
        }
    }

    /// Sets up the interpreter at `exe` (a resolved path such as
    /// `/usr/bin/python3.11`) with the image's environment.
    fn python(&mut self, exe: &str, env: &[String], script_dir: Option<&str>) -> bool {
        let name = exe.rsplit('/').next().unwrap_or(exe);
        let Some(ver) = name.strip_prefix("python") else {
            return false;
        };
        let Some((major, minor)) = ver.split_once('.') else {
            return false;
        };
        if major.parse::<u32>().is_err() || minor.parse::<u32>().is_err() {
            return false;
        }
        let x_y = format!("{major}.{minor}");
        let prefix = parent(parent(exe)).to_string();
        let mut path: Vec<String> = Vec::new();
        if let Some(d) = script_dir {
            path.push(d.to_string());
        }
        for e in env {
            if let Some(v) = e.strip_prefix("PYTHONPATH=") {
                path.extend(v.split(':').filter(|p| p.starts_with('/')).map(str::to_string));
            }
        }
        let venv = self.file(&join(&prefix, "pyvenv.cfg")).is_some();
        for p in [&prefix, "/usr/local", "/usr"] {
            let lib = format!("{p}/lib/python{x_y}");
            path.push(lib.clone());
            path.push(format!("{lib}/lib-dynload"));
        }
        if venv {
            path.push(format!("{prefix}/lib/python{x_y}/site-packages"));
        }
        for p in [
            format!("/usr/local/lib/python{x_y}/site-packages"),
            format!("/usr/local/lib/python{x_y}/dist-packages"),
            format!("/usr/lib/python{major}/dist-packages"),
            format!("/usr/lib/python{x_y}/site-packages"),
            format!("/usr/lib/python{x_y}/dist-packages"),
        ] {
            path.push(p);
        }
        let mut seen = HashSet::new();
        path.retain(|p| self.is_dir(p) && seen.insert(p.clone()));
        self.py = Some(Python {
            tag: format!("cpython-{major}{minor}"),
            path,
        });
        // What every start imports, and the `.pth` files of site-packages.
        for m in [
            "encodings",
            "encodings.aliases",
            "encodings.utf_8",
            "site",
            "sitecustomize",
        ] {
            self.module(m, 0);
        }
        let dirs = self.py.as_ref().map(|p| p.path.clone()).unwrap_or_default();
        for d in dirs.iter().filter(|d| d.ends_with("-packages")) {
            let Some(node) = self.index.resolve_follow(d.as_bytes()).and_then(|i| self.index.node(i)) else {
                continue;
            };
            let pth: Vec<u64> = node
                .entries
                .iter()
                .filter(|e| e.name.ends_with(b".pth"))
                .map(|e| e.ino)
                .collect();
            for ino in pth {
                self.read(ino, 0, u64::MAX);
            }
        }
        true
    }

    /// The modules a `-c` program imports.
    fn code(&mut self, code: &str) {
        let src = code.replace(';', "\n");
        for i in crate::imports(src.as_bytes()) {
            if i.level == 0 {
                self.module(&i.module, 0);
                for n in &i.names {
                    let sub = format!("{}.{n}", i.module);
                    if self.find(&sub).is_some() {
                        self.module(&sub, 0);
                    }
                }
            }
        }
    }
}

/// The bytes `process` is expected to read first in the image, in order.
/// Empty when nothing is known of its program.
pub fn guess(index: &Index, hints: &Hints, process: &Process) -> Vec<Read> {
    let mut out = Vec::new();
    walk(index, hints, process, &mut out);
    out
}

fn walk(index: &Index, hints: &Hints, process: &Process, out: &mut Vec<Read>) {
    let mut w = Walk {
        index,
        hints,
        out,
        seen: HashSet::new(),
        bytes: 0,
        objects: HashSet::new(),
        modules: HashSet::new(),
        py: None,
        found: Default::default(),
    };
    let Some(arg0) = process.args.first() else {
        return;
    };
    let path_var = process
        .env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let cwd = if process.cwd.is_empty() { "/" } else { &process.cwd };
    let find_program = |w: &Walk, a: &str| -> Option<String> {
        if a.starts_with('/') {
            w.file(a).map(|_| a.to_string())
        } else if a.contains('/') {
            let p = join(cwd, a);
            w.file(&p).map(|_| p)
        } else {
            path_var
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| join(d, a))
                .find(|p| w.file(p).is_some())
        }
    };
    let Some(mut exe) = find_program(&w, arg0) else {
        return;
    };
    let mut args: Vec<String> = process.args[1..].to_vec();
    for f in START_FILES {
        w.read_path(f);
    }
    // A Python script run as a program: its interpreter runs it.
    if let Some(Fact::Python {
        shebang: Some(interp), ..
    }) = w.file(&exe).and_then(|i| w.fact(i))
    {
        if let Some(p) = find_program(&w, interp) {
            args.insert(0, exe.clone());
            exe = p;
        }
    }
    w.program(&exe);
    let resolved = w
        .index
        .resolve_follow(exe.as_bytes())
        .and_then(|i| {
            let n = w.index.node(i)?;
            let dir = w.index.dir_path(n.parent)?;
            let name = &w.index.node(n.parent)?.entries.iter().find(|e| e.ino == i)?.name;
            Some(join(
                &format!("/{}", String::from_utf8_lossy(&dir)),
                &String::from_utf8_lossy(name),
            ))
        })
        .unwrap_or(exe.clone());
    // The interpreter's options, then what it runs.
    let mut it = args.iter();
    let mut run: Option<(char, String)> = None;
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "-m" => {
                run = it.next().map(|v| (a.as_bytes()[1] as char, v.clone()));
                break;
            }
            "-X" | "-W" => {
                it.next();
            }
            s if s.starts_with('-') && s.len() > 1 => {}
            s => {
                run = Some(('s', s.to_string()));
                break;
            }
        }
    }
    let script = match &run {
        Some(('s', s)) => Some(if s.starts_with('/') { s.clone() } else { join(cwd, s) }),
        _ => None,
    };
    let script_dir = match (&run, &script) {
        (Some(('s', _)), Some(s)) => Some(parent(s).to_string()),
        _ => Some(cwd.to_string()),
    };
    if !w.python(&resolved, &process.env, script_dir.as_deref()) {
        return;
    }
    match run {
        Some(('c', code)) => w.code(&code),
        Some(('m', m)) => {
            w.module(&m, 0);
            w.module(&format!("{m}.__main__"), 0);
        }
        Some((_, _)) => {
            if let Some(ino) = script.as_deref().and_then(|s| w.file(s)) {
                w.read(ino, 0, u64::MAX);
                w.imports_of(ino, "", 0);
            }
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ElfFact, Fact, Import};
    use clip_format::{DirEntry, Image, Node, ROOT_INO};

    /// A one-layer image of `files`: (path, size or symlink target); each
    /// file's bytes start at 256 MiB times its place in the list (one
    /// past it).
    struct Fake {
        index: Index,
        at: std::collections::HashMap<String, u64>,
    }

    fn node(kind: Kind, size: u64, data: Data, target: &str, parent: u64) -> Node {
        Node {
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1000,
            mtime_nsec: 0,
            size,
            nlink: 1,
            rdev: 0,
            parent,
            target: target.as_bytes().to_vec(),
            xattrs: vec![],
            data,
            entries: vec![],
        }
    }

    fn fake(files: &[(&str, Result<u64, &str>)]) -> Fake {
        let mut nodes = vec![node(Kind::Dir, 0, Data::None, "", ROOT_INO)];
        let mut at = std::collections::HashMap::new();
        for (i, (path, what)) in files.iter().enumerate() {
            let mut dir = ROOT_INO;
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            for (k, part) in parts.iter().enumerate() {
                let last = k + 1 == parts.len();
                let found = nodes[dir as usize - 1]
                    .entries
                    .iter()
                    .find(|e| e.name == part.as_bytes())
                    .map(|e| e.ino);
                let ino = match found {
                    Some(ino) => ino,
                    None => {
                        let n = match (last, what) {
                            (false, _) => node(Kind::Dir, 0, Data::None, "", dir),
                            (true, Ok(size)) => {
                                let offset = (i as u64 + 1) << 28;
                                at.insert(path.to_string(), offset);
                                node(Kind::File, *size, Data::Contiguous { layer: 0, offset }, "", dir)
                            }
                            (true, Err(target)) => node(Kind::Symlink, 0, Data::None, target, dir),
                        };
                        nodes.push(n);
                        let ino = nodes.len() as u64;
                        let d = &mut nodes[dir as usize - 1];
                        d.entries.push(DirEntry {
                            name: part.as_bytes().to_vec(),
                            ino,
                        });
                        d.entries.sort_by(|a, b| a.name.cmp(&b.name));
                        ino
                    }
                };
                dir = ino;
            }
        }
        let image = Image {
            reference: "x".into(),
            manifest_digest: "sha256:m".into(),
            manifest_media_type: String::new(),
            platform: "linux/amd64".into(),
            config_digest: String::new(),
            config: br#"{"config":{"Env":["PATH=/usr/bin"],"Cmd":["python3"]}}"#.to_vec(),
        };
        Fake {
            index: Index {
                image,
                spacing: 2 << 20,
                layers: vec![],
                nodes,
            },
            at,
        }
    }

    fn elf(needed: &[&str], runpath: &[&str], names: &[&str], interp: Option<&str>) -> Fact {
        Fact::Elf(ElfFact {
            interp: interp.map(str::to_string),
            needed: needed.iter().map(|s| s.to_string()).collect(),
            runpath: runpath.iter().map(|s| s.to_string()).collect(),
            rpath: false,
            ranges: vec![(0, 4096), (10 << 20, 1 << 20)],
            names: names.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn py(imports: &[(u8, &str, &[&str])]) -> Fact {
        Fact::Python {
            shebang: None,
            imports: imports
                .iter()
                .map(|(l, m, n)| Import {
                    level: *l,
                    module: m.to_string(),
                    names: n.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn follows_the_loader_and_the_imports_in_order() {
        const SITE: &str = "/usr/local/lib/python3.11/dist-packages";
        let f = fake(&[
            ("/etc/passwd", Ok(100)),
            ("/usr/bin/python3", Err("python3.11")),
            ("/usr/bin/python3.11", Ok(5000)),
            (
                "/lib64/ld-linux-x86-64.so.2",
                Err("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            ),
            ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", Ok(200)),
            ("/usr/lib/x86_64-linux-gnu/libm.so.6", Ok(300)),
            ("/usr/lib/python3.11/encodings/__init__.py", Ok(10)),
            (
                "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
                Ok(20),
            ),
            ("/usr/lib/python3.11/codecs.py", Ok(30)),
            ("/usr/local/lib/python3.11/dist-packages/pkg/__init__.py", Ok(40)),
            ("/usr/local/lib/python3.11/dist-packages/pkg/sub.py", Ok(50)),
            (
                "/usr/local/lib/python3.11/dist-packages/pkg/ext.cpython-311-x86_64-linux-gnu.so",
                Ok(60 << 20),
            ),
            ("/usr/local/lib/python3.11/dist-packages/pkg.libs/libdep.so", Ok(70)),
            ("/usr/local/lib/python3.11/dist-packages/other/__init__.py", Ok(80)),
            ("/usr/local/lib/python3.11/dist-packages/other/mod.py", Ok(90)),
            ("/usr/local/lib/python3.11/dist-packages/unused.py", Ok(95)),
        ]);
        let at = |p: &str| f.at[p];
        let mut h = Hints::new();
        let mut put = |p: &str, fact: Fact| {
            h.files.insert((0, at(p)), fact);
        };
        put(
            "/usr/bin/python3.11",
            elf(&["libm.so.6"], &[], &[], Some("/lib64/ld-linux-x86-64.so.2")),
        );
        put(
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            elf(&[], &[], &[], None),
        );
        put("/usr/lib/x86_64-linux-gnu/libm.so.6", elf(&[], &[], &[], None));
        put("/usr/lib/python3.11/encodings/__init__.py", py(&[(0, "codecs", &[])]));
        // Built from this very source (mtime 1000, 10 bytes): fresh.
        put(
            "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
            Fact::Pyc { mtime: 1000, size: 10 },
        );
        put(
            &format!("{SITE}/pkg/__init__.py"),
            py(&[
                (1, "", &["sub", "not_a_module"]),
                (1, "ext", &["thing"]),
                (0, "missing", &[]),
            ]),
        );
        put(
            &format!("{SITE}/pkg/ext.cpython-311-x86_64-linux-gnu.so"),
            elf(
                &["libdep.so", "libm.so.6"],
                &["$ORIGIN/../pkg.libs"],
                &["other.mod", "nothere", "pkg"],
                None,
            ),
        );
        let p = Process::of_image(
            &f.index.image.config,
            &["python3".into(), "-c".into(), "import pkg".into()],
            None,
            &[],
            None,
        );
        assert_eq!(p.args, ["python3", "-c", "import pkg"]);
        let reads = guess(&f.index, &h, &p);
        let files: Vec<(&str, u64, u64)> = reads
            .iter()
            .map(|&(l, pos, len)| {
                assert_eq!(l, 0);
                let (p, o) = f.at.iter().filter(|(_, &o)| o <= pos).max_by_key(|(_, &o)| o).unwrap();
                (p.as_str(), pos - o, len)
            })
            .collect();
        let ext = format!("{SITE}/pkg/ext.cpython-311-x86_64-linux-gnu.so");
        let want: Vec<(String, u64, u64)> = vec![
            ("/etc/passwd".into(), 0, 100),
            ("/usr/bin/python3.11".into(), 0, 5000),
            ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into(), 0, 200),
            ("/usr/lib/x86_64-linux-gnu/libm.so.6".into(), 0, 300),
            // The compiled module is fresh: its source is not read.
            (
                "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc".into(),
                0,
                20,
            ),
            // No compiled module: the source.
            ("/usr/lib/python3.11/codecs.py".into(), 0, 30),
            (format!("{SITE}/pkg/__init__.py"), 0, 40),
            (format!("{SITE}/pkg/sub.py"), 0, 50),
            // A large object: its head, then the loader's ranges.
            (ext.clone(), 0, 2 << 20),
            (ext.clone(), 10 << 20, 1 << 20),
            (format!("{SITE}/pkg.libs/libdep.so"), 0, 70),
            // Named in the extension's strings.
            (format!("{SITE}/other/__init__.py"), 0, 80),
            (format!("{SITE}/other/mod.py"), 0, 90),
        ];
        let got: Vec<(String, u64, u64)> = files.iter().map(|&(p, o, l)| (p.to_string(), o, l)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_command_combines_as_docker_does() {
        let config =
            br#"{"config":{"Entrypoint":["/init"],"Cmd":["serve"],"Env":["PATH=/bin","A=1"],"WorkingDir":"/app"}}"#;
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = Process::of_image(config, &[], None, &s(&["PATH=/opt/bin"]), None);
        assert_eq!((p.args, p.cwd.as_str()), (s(&["/init", "serve"]), "/app"));
        assert_eq!(p.env, s(&["PATH=/bin", "A=1", "PATH=/opt/bin"]));
        assert_eq!(
            Process::of_image(config, &s(&["x"]), None, &[], Some("/w")).args,
            s(&["/init", "x"])
        );
        assert_eq!(Process::of_image(config, &[], Some("sh"), &[], None).args, s(&["sh"]));
        assert_eq!(
            Process::of_image(config, &s(&["ls"]), Some(""), &[], None).args,
            s(&["ls"])
        );
        assert!(Process::of_image(b"not json", &[], None, &[], None).args.is_empty());
    }

    #[test]
    fn unknown_programs_and_no_hints() {
        let f = fake(&[("/bin/sh", Ok(10)), ("/etc/passwd", Ok(5))]);
        let h = Hints::new();
        let p = |args: &[&str]| Process {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: String::new(),
        };
        assert!(guess(&f.index, &h, &p(&[])).is_empty());
        assert!(guess(&f.index, &h, &p(&["nosuch"])).is_empty());
        // A program with no facts: read whole, with the start files.
        let r = guess(&f.index, &h, &p(&["sh", "-c", "true"]));
        assert_eq!(r, vec![(0, f.at["/etc/passwd"], 5), (0, f.at["/bin/sh"], 10)]);
    }
}
