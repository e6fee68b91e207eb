//! A real `fasternet-serve` process on an ephemeral loopback port, for HTTP tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub base: String,
    /// The gRPC address (host:port), when the server was started with `--grpc-port`.
    pub grpc: Option<String>,
    /// The metrics listener's base URL, when started with `--metrics-port`.
    pub metrics_base: Option<String>,
    pub logs: mpsc::Receiver<String>,
    /// The log lines up to and including `listening`.
    pub startup_logs: Vec<String>,
    /// Holds the address file.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the bundled model with extra flags and waits until /readyz answers 200. The
    /// address comes from `--address-file`, as a supervisor would learn it.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[]).await
    }

    /// [`Server::start`] with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let address_file = dir.path().join("address");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fasternet-serve"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--threads", "2"])
            .args(["--log-format", "json", "--address-file"])
            .arg(&address_file)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                break text;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let said: Vec<String> = logs.try_iter().collect();
                panic!("the server exited ({status}) before serving:\n{}", said.join("\n"));
            }
            assert!(Instant::now() < deadline, "the server wrote no address file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The start-up log ends with `listening`, written before the address file.
        let mut startup_logs = Vec::new();
        while !startup_logs.last().is_some_and(|l: &String| l.contains("\"listening\"")) {
            let wait = deadline.saturating_duration_since(Instant::now());
            startup_logs.push(logs.recv_timeout(wait).expect("the start-up log"));
        }
        let mut lines = addr.lines();
        let base = format!("http://{}", lines.next().expect("the HTTP address"));
        let grpc = lines.next().filter(|l| !l.is_empty()).map(str::to_string);
        let metrics_base = lines.next().map(|l| format!("http://{l}"));
        let server = Server { child, base, grpc, metrics_base, logs, startup_logs, _dir: dir };
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = client.get(server.url("/readyz")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server never became ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (off the async runtime) for the process to exit, failing after `limit`.
    pub async fn wait_for_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                assert!(Instant::now() < deadline, "the server did not exit");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap()
    }

    /// The log lines written until `requests` more HTTP responses have been logged. The lines
    /// come through a pipe, so they can arrive after the client has its response.
    pub fn logs_through_responses(&self, requests: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        let mut responses = 0;
        while responses < requests {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = self.logs.recv_timeout(wait).unwrap_or_else(|_| {
                panic!("{responses} of {requests} responses logged:\n{}", lines.join("\n"))
            });
            responses += usize::from(line.contains("finished processing request"));
            lines.push(line);
        }
        lines
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/inputs").join(name),
    )
    .unwrap()
}

/// A 28x28 greyscale PNG like the bundled model's training data.
pub fn small_png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([((x * 9 + y * 5) as u8).wrapping_mul(seed | 1)])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// Runs a command to the end off the async runtime (a test's server keeps answering); its
/// status and its stdout and stderr as one text.
pub async fn run_to_end(mut command: Command) -> (std::process::ExitStatus, String) {
    let out = tokio::task::spawn_blocking(move || command.output().expect("the command runs"))
        .await
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// Runs a command-line tool if it exists; None when it is not installed.
pub fn tool_output(program: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new(program).args(args).output().ok()
}

/// In CI a missing tool fails the test; on a developer machine it skips the check.
pub fn require_tool(program: &str, install: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI must install {program} ({install})");
        eprintln!("skipped: {program} not installed ({install})");
    }
    found
}

/// Inserts an EXIF APP1 segment with the given orientation right after a JPEG's SOI marker.
pub fn with_exif_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0".to_vec();
    exif.extend_from_slice(&[orientation, 0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&exif);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// Appends one PNG chunk (length, type, data, CRC) to `out`.
pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A PNG from its header fields and rows (each with its filter byte), compressed one row at a
/// time so that a huge image costs no memory to make. `extra` chunks go between IHDR and IDAT.
pub fn png_from_rows(
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
    extra: &[(&[u8; 4], Vec<u8>)],
    rows: impl Iterator<Item = Vec<u8>>,
) -> Vec<u8> {
    use std::io::Write;
    let mut idat = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for row in rows {
        idat.write_all(&row).unwrap();
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        png_chunk(&mut out, kind, data);
    }
    png_chunk(&mut out, b"IDAT", &idat.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A PNG whose pixels are all zero (colour type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA).
pub fn zero_png(
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
    extra: &[(&[u8; 4], Vec<u8>)],
) -> Vec<u8> {
    let channels = match color_type {
        0 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        _ => panic!("colour type {color_type}"),
    };
    let row = vec![0u8; 1 + width as usize * channels * bit_depth as usize / 8];
    png_from_rows(width, height, bit_depth, color_type, extra, (0..height).map(|_| row.clone()))
}

/// zlib data that inflates to `n` zero bytes.
pub fn deflated_zeros(n: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        z.write_all(&chunk[..k]).unwrap();
        left -= k;
    }
    z.finish().unwrap()
}

/// One v2 gRPC ModelInfer of a small PNG through tritonclient (Python), with a W3C
/// `traceparent` in its metadata when given. False (and a note) when tritonclient is not
/// installed; CI installs it (.ci/run), and there its absence fails the test.
pub async fn tritonclient_model_infer(s: &Server, traceparent: Option<&str>) -> bool {
    let probe = Command::new("python3").args(["-c", "import tritonclient.grpc"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let install = "pip install 'tritonclient[grpc]'";
        assert!(std::env::var_os("CI").is_none(), "CI must install tritonclient ({install})");
        eprintln!("skipped the gRPC call: tritonclient is not installed ({install})");
        return false;
    }
    let script = "import sys, numpy as np, tritonclient.grpc as g\n\
                  addr, image, model, traceparent = sys.argv[1:5]\n\
                  i = g.InferInput('image', [1], 'BYTES')\n\
                  i.set_data_from_numpy(np.array([open(image, 'rb').read()], dtype=np.object_))\n\
                  headers = {'traceparent': traceparent} if traceparent else None\n\
                  g.InferenceServerClient(addr).infer(model, [i], headers=headers)\n";
    let image = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fashion_mnist_t10k_0.png");
    let grpc = s.grpc.clone().expect("started with --grpc-port");
    let mut python = Command::new("python3");
    python.args(["-c", script, &grpc, image, "fasternet_t0.fashion_mnist"]);
    python.arg(traceparent.unwrap_or(""));
    let (status, report) = run_to_end(python).await;
    assert!(status.success(), "tritonclient's ModelInfer failed:\n{report}");
    true
}

/// Whether Chromium can be driven (chromedriver, and selenium for `python3`): in CI their
/// absence fails the test; elsewhere it is skipped with a message.
pub fn require_browser() -> bool {
    let selenium =
        Command::new("python3").args(["-c", "import selenium"]).status().is_ok_and(|s| s.success());
    if !require_tool("chromedriver", "apt-get install chromium chromium-driver") || !selenium {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install selenium (pip install selenium)"
        );
        eprintln!("skipped: no selenium");
        return false;
    }
    true
}
