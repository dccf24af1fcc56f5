//! `clipctl daemon`: the node service's status, stop and upgrade.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clip_api::{Reply, Request};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Whether clipd runs, and its processes (does not start it).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Unmount everything and stop clipd.
    Stop,
    /// Hand every mount over to a new clipd binary (running containers
    /// keep their files), and restart with it.
    Upgrade {
        /// The new clipd (default: the one next to clipctl).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

/// Whether process `pid` runs (a zombie has ended).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Status { json } => match crate::client::call_running(&Request::Ping)? {
            Some(Reply::Pong(p)) if json => println!("{}", serde_json::to_string(&p)?),
            Some(Reply::Pong(p)) => println!(
                "clipd {} running: supervisor {}, worker {} (up {:.0} s, {} takeover(s))",
                p.version, p.supervisor_pid, p.worker_pid, p.uptime, p.takeovers
            ),
            Some(_) => bail!("clipd answered something else"),
            None => {
                println!("clipd is not running");
                std::process::exit(3);
            }
        },
        Command::Stop => {
            let Some(Reply::Pong(p)) = crate::client::call_running(&Request::Ping)? else {
                println!("clipd is not running");
                return Ok(());
            };
            crate::client::call_running(&Request::Stop)?;
            // Returns once it is gone, so that a clipctl started next
            // starts a new one instead of talking to one that is leaving.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while running(p.supervisor_pid) {
                if std::time::Instant::now() > deadline {
                    bail!("clipd (pid {}) did not stop within 60 s", p.supervisor_pid);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Command::Upgrade { binary } => {
            let binary = binary.unwrap_or_else(clip_api::clipd_binary);
            crate::client::call(&Request::Upgrade {
                binary: std::path::absolute(binary)?,
            })?;
        }
    }
    Ok(())
}
