//! `clipctl metrics`: clipd's metrics, printed or served.

use anyhow::{bail, Result};
use clip_api::{Reply, Request};

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
    /// Address to serve on (127.0.0.1 unless given).
    #[arg(long, default_value = "127.0.0.1", requires = "serve")]
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

fn render(format: Format) -> Result<(String, &'static str)> {
    let json = format == Format::Json;
    let Reply::Text { text } = crate::client::call(&Request::Metrics { json })? else {
        bail!("clipd answered something else");
    };
    Ok((text, if json { "application/json" } else { OPENMETRICS }))
}

pub fn run(a: Args) -> Result<()> {
    if !a.serve {
        print!("{}", render(a.format)?.0);
        return Ok(());
    }
    let addr = std::net::SocketAddr::new(a.address, a.port);
    let server = tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
    eprintln!("serving metrics on http://{addr}/metrics");
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let response = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match render(a.format) {
                Ok((body, content_type)) => tiny_http::Response::from_string(body)
                    .with_header(tiny_http::Header::from_bytes("Content-Type", content_type).expect("valid header")),
                Err(e) => tiny_http::Response::from_string(format!("{e:#}\n")).with_status_code(500),
            },
            (tiny_http::Method::Get, "/") => tiny_http::Response::from_string("clip metrics: /metrics\n".to_string()),
            _ => tiny_http::Response::from_string("not found\n".to_string()).with_status_code(404),
        };
        let _ = req.respond(response);
    }
    Ok(())
}
