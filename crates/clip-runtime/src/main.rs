//! `clip-runtime`: runc's command line over [`clip_runtime`]. Single
//! threaded on purpose: libcontainer clones this process.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use clip_runtime::{CreateOptions, ExecOptions, Root};

#[derive(Parser)]
#[command(
    name = "clip-runtime",
    version,
    about = "clip's OCI runtime (runc's command line, youki's libcontainer)"
)]
struct Cli {
    /// Where container state is kept.
    #[arg(long, global = true, default_value = "/run/clip-runtime")]
    root: PathBuf,
    /// Log file (as runc's --log); stderr when not given.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format: text or json (accepted for runc compatibility; text is written).
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility; cgroups are managed through cgroupfs.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// The bundle directory (config.json and rootfs).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// A unix socket to receive the pty master on, for terminal: true.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Write the container's init pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    no_pivot: bool,
    #[arg(long)]
    no_new_keyring: bool,
    #[arg(long, default_value_t = 0)]
    preserve_fds: i32,
    id: String,
}

impl CreateArgs {
    fn options(&self) -> CreateOptions {
        CreateOptions {
            bundle: self.bundle.clone(),
            console_socket: self.console_socket.clone(),
            pid_file: self.pid_file.clone(),
            preserve_fds: self.preserve_fds,
            no_pivot: self.no_pivot,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a container: set up, waiting for start.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Print a container's state as the runtime spec's JSON.
    State { id: String },
    /// Send a signal to a container's init (or, with --all, every process).
    Kill {
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a container's resources.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; in the foreground unless --detach.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
        /// Keep the container's state after it exits.
        #[arg(long)]
        keep: bool,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run another process in a running container.
    Exec {
        #[arg(long)]
        console_socket: Option<PathBuf>,
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// KEY=VALUE; repeatable.
        #[arg(short, long)]
        env: Vec<String>,
        #[arg(short, long)]
        tty: bool,
        /// UID[:GID].
        #[arg(short, long)]
        user: Option<String>,
        #[arg(short = 'g', long)]
        additional_gids: Vec<u32>,
        /// A process.json to run instead of the arguments.
        #[arg(short, long)]
        process: Option<PathBuf>,
        #[arg(short, long)]
        detach: bool,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(long)]
        no_new_privs: bool,
        #[arg(long)]
        cap: Vec<String>,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List a container's processes (`ps` output, or --format json pids).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
}

fn init_logging(cli: &Cli) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    // libcgroups warns about every controller this kernel lacks (hugetlb,
    // rdma, ...) on each command, libcontainer about ambient capabilities
    // it cannot raise (runc's default spec asks for some): errors only
    // from them unless debugging, as runc is quiet about both.
    // On a terminal, the error that ends the command is printed once, as
    // one line (main); libcontainer's own copies of it (one per layer it
    // passes through) go to a log file only.
    let level = if cli.debug {
        "debug"
    } else if cli.log.is_some() {
        "warn,libcgroups=error,libcontainer=error"
    } else {
        "warn,libcgroups=off,libcontainer=off"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    match &cli.log {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log {}", path.display()))?;
            b.with_writer(std::sync::Mutex::new(f)).init();
        }
        None => b.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn parse_user(s: &str) -> Result<(u32, Option<u32>)> {
    let (u, g) = s.split_once(':').map_or((s, None), |(u, g)| (u, Some(g)));
    Ok((
        u.parse().context("user must be a numeric uid")?,
        g.map(|g| g.parse().context("group must be a numeric gid"))
            .transpose()?,
    ))
}

fn run(cli: Cli) -> Result<i32> {
    let root = Root(cli.root.clone());
    match cli.command {
        Command::Create(a) => {
            clip_runtime::create(&root, &a.id, &a.options(), true)?;
        }
        Command::Start { id } => clip_runtime::start(&root, &id)?,
        Command::State { id } => {
            println!("{}", serde_json::to_string_pretty(&clip_runtime::state(&root, &id)?)?);
        }
        Command::Kill { id, signal, all } => clip_runtime::kill(&root, &id, &signal, all)?,
        Command::Delete { force, id } => clip_runtime::delete(&root, &id, force)?,
        Command::Run { create, detach, keep } => {
            let mut c = clip_runtime::create(&root, &create.id, &create.options(), detach)?;
            // The same start as `start`: it waits for the exec, then runs
            // poststart hooks.
            if let Err(e) = clip_runtime::start(&root, &create.id) {
                let _ = c.delete(true);
                return Err(e.into());
            }
            if detach {
                return Ok(0);
            }
            let pid = c.pid().map(|p| p.as_raw()).context("container has no pid")?;
            let code = clip_runtime::foreground(pid)?;
            if !keep {
                clip_runtime::delete(&root, &create.id, true)?;
            }
            return Ok(code);
        }
        Command::List { format, quiet } => {
            let rows = clip_runtime::list(&root);
            if quiet {
                for r in &rows {
                    println!("{}", r.id);
                }
            } else if format == "json" {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({"id": r.id, "pid": r.pid, "status": r.status,
                            "bundle": r.bundle, "created": r.created, "owner": r.owner})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {:<32} OWNER",
                    "ID", "PID", "STATUS", "BUNDLE", "CREATED"
                );
                for r in &rows {
                    println!(
                        "{:<24} {:<8} {:<10} {:<40} {:<32} {}",
                        r.id,
                        r.pid,
                        r.status,
                        r.bundle.display(),
                        r.created,
                        r.owner
                    );
                }
            }
        }
        Command::Exec {
            console_socket,
            cwd,
            env,
            tty: _,
            user,
            additional_gids,
            process,
            detach,
            pid_file,
            no_new_privs,
            cap,
            id,
            command,
        } => {
            let env: HashMap<String, String> = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("{kv}: not KEY=VALUE"))
                })
                .collect::<Result<_>>()?;
            let o = ExecOptions {
                process,
                args: command,
                env,
                cwd,
                user: user.as_deref().map(parse_user).transpose()?,
                additional_gids,
                no_new_privs,
                caps: cap,
                console_socket,
                pid_file,
                detach,
            };
            let pid = clip_runtime::exec(&root, &id, &o)?;
            if !detach {
                return Ok(clip_runtime::foreground(pid)?);
            }
        }
        Command::Ps { format, id, ps_args } => {
            let pids = clip_runtime::pids(&root, &id)?;
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                let args = if ps_args.is_empty() {
                    vec!["-ef".to_string()]
                } else {
                    ps_args
                };
                let out = std::process::Command::new("ps")
                    .args(&args)
                    .output()
                    .context("running ps")?;
                let text = String::from_utf8_lossy(&out.stdout);
                let mut lines = text.lines();
                let header = lines.next().unwrap_or_default();
                let col = header
                    .split_whitespace()
                    .position(|h| h == "PID")
                    .context("ps output has no PID column")?;
                println!("{header}");
                for l in lines {
                    if l.split_whitespace()
                        .nth(col)
                        .and_then(|p| p.parse::<i32>().ok())
                        .is_some_and(|p| pids.contains(&p))
                    {
                        println!("{l}");
                    }
                }
            }
        }
    }
    Ok(0)
}

/// libcontainer clones this process and runs Rust in the child: with other
/// threads holding locks, the child could deadlock. Nothing here starts a
/// thread; this makes sure of it.
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").map_or(true, |d| d.count() == 1)
}

fn main() {
    let cli = Cli::parse();
    if !single_threaded() {
        eprintln!("clip-runtime: refusing to run multi-threaded (libcontainer clones this process)");
        std::process::exit(1);
    }
    if let Err(e) = init_logging(&cli) {
        eprintln!("clip-runtime: {e:#}");
        std::process::exit(1);
    }
    let cli_logs_to_file = cli.log.is_some();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if cli_logs_to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("clip-runtime: {e:#}");
            std::process::exit(1);
        }
    }
}
