//! `clipctl metrics`: the host's clip metrics, printed or served.

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Serve /metrics over HTTP until killed, instead of printing once.
    #[arg(long)]
    serve: bool,
    /// Port to serve on.
    #[arg(long, default_value_t = 9310, requires = "serve")]
    port: u16,
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0", requires = "serve")]
    address: std::net::IpAddr,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// The Prometheus/OpenMetrics text format.
    Text,
    /// JSON: families by name, each with help, type and samples.
    Json,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn collect() -> Result<clip_metrics::Snapshot> {
    let cache = clip_fs::serve::ServeOptions::from_env().cache_dir;
    let dir = clip_metrics::host::dir_from_env();
    clip_metrics::host::collect(&dir, Some(clip_store::usage(&cache))).context("collecting metrics")
}

fn render(format: Format) -> Result<(String, &'static str)> {
    let snap = collect()?;
    Ok(match format {
        Format::Text => (snap.encode_text(), OPENMETRICS),
        Format::Json => (serde_json::to_string_pretty(&snap)? + "\n", "application/json"),
    })
}

pub fn run(a: Args) -> Result<()> {
    if !a.serve {
        print!("{}", render(a.format)?.0);
        return Ok(());
    }
    let addr = std::net::SocketAddr::new(a.address, a.port);
    let server = tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
    tracing::info!(%addr, "serving metrics");
    eprintln!("serving metrics on http://{addr}/metrics");
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let response = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match render(a.format) {
                Ok((body, content_type)) => tiny_http::Response::from_string(body)
                    .with_header(tiny_http::Header::from_bytes("Content-Type", content_type).expect("valid header")),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "metrics collection failed");
                    tiny_http::Response::from_string(format!("{e:#}\n")).with_status_code(500)
                }
            },
            (tiny_http::Method::Get, "/") => tiny_http::Response::from_string("clip metrics: /metrics\n".to_string()),
            _ => tiny_http::Response::from_string("not found\n".to_string()).with_status_code(404),
        };
        let _ = req.respond(response);
    }
    Ok(())
}
