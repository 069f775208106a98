//! Child processes: the real binaries, started with a test's environment, their stderr
//! copied to a log file and scanned for the line announcing their address.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// Where the binaries are: `BULKOPS_BIN_DIR`, else `target/debug` of the workspace.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BULKOPS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug")
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A running program.
pub struct Proc {
    /// Its name in logs (`producer-1`, `worker-2`, …).
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// The address it announced (HTTP API or metrics).
    pub addr: Option<String>,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `env` and waits until it prints `marker` followed by its
    /// address (or exits).
    pub async fn start(
        program: &str,
        args: &[&str],
        name: &str,
        env: &[(String, String)],
        log_dir: &Path,
        marker: Option<&str>,
    ) -> anyhow::Result<Self> {
        let path = bin_dir().join(program);
        if !path.is_file() {
            bail!(
                "{} is missing: build the binaries first (make test does: cargo build --workspace)",
                path.display()
            );
        }
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, _) in std::env::vars() {
            // A developer's own OTEL_* would send the tests' spans to their collector.
            if k.starts_with("BULKOPS") || k == "RUST_LOG" || k.starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {program}"))?;
        let pid = child.id().context("child has no pid")?;
        let log = log_dir.join(format!("{name}.log"));
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .await?;
        let stderr = child.stderr.take().context("no stderr")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (addr_tx, mut addr_rx) = tokio::sync::mpsc::channel::<String>(1);
        let wants_addr = marker.is_some();
        let marker = marker.map(str::to_owned);
        tokio::spawn(async move {
            let mut err_lines = BufReader::new(stderr).lines();
            let mut out_lines = BufReader::new(stdout).lines();
            let mut err_done = false;
            let mut out_done = false;
            while !(err_done && out_done) {
                let line = tokio::select! {
                    l = err_lines.next_line(), if !err_done => match l {
                        Ok(Some(l)) => l,
                        _ => { err_done = true; continue; }
                    },
                    l = out_lines.next_line(), if !out_done => match l {
                        Ok(Some(l)) => l,
                        _ => { out_done = true; continue; }
                    },
                };
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
                if let Some(m) = &marker
                    && let Some(pos) = line.find(m.as_str())
                {
                    let rest = &line[pos + m.len()..];
                    if let Some(addr) = rest.split_whitespace().next() {
                        let _ = addr_tx.try_send(addr.to_owned());
                    }
                }
            }
            let _ = file.flush().await;
        });
        let mut proc = Proc {
            name: name.to_owned(),
            child,
            pid,
            addr: None,
            log,
        };
        if wants_addr {
            let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx.recv()).await;
            match addr {
                Ok(Some(a)) => proc.addr = Some(a),
                _ => {
                    let status = proc.child.try_wait().ok().flatten();
                    let tail = tokio::fs::read_to_string(&proc.log)
                        .await
                        .unwrap_or_default();
                    bail!("{name} did not announce its address (exit: {status:?}); log:\n{tail}");
                }
            }
        }
        Ok(proc)
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-s", sig, &self.pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -s {sig} {} failed", self.pid);
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.kill().await;
                bail!("{} did not exit within {within:?} of SIGTERM", self.name)
            }
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
