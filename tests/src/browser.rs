//! A real, headless browser for the console's end-to-end test: Debian's `chromium`
//! driven over WebDriver by `chromedriver` (both installed by `.ci/run` when missing),
//! through `fantoccini`.
//!
//! Each [`Browser`] starts its own chromedriver on a free port, in a process group of its
//! own, with a fresh profile directory; dropping it kills the group (chromedriver and
//! every Chromium process it started) and removes the profile, also when the test fails.
//! Screenshots go to `target/console-screenshots/`, downloads to a directory of the
//! browser's own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::process::workspace_root;

/// The flags Chromium needs here (as root, in a container, offline).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
];

/// Where screenshots go.
pub fn screenshot_dir() -> PathBuf {
    workspace_root().join("target").join("console-screenshots")
}

/// A headless Chromium under a chromedriver of its own.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
    _driver: Driver,
}

/// The chromedriver process group and the scratch directory, removed on drop.
struct Driver {
    child: std::process::Child,
    scratch: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        let pgid = self.child.id();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn program(name: &str, debian_package: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed: apt-get install {debian_package} (.ci/run installs it)")
}

impl Browser {
    /// Starts chromedriver and a Chromium session; `name` names its scratch directories.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let chromedriver = program("chromedriver", "chromium-driver")?;
        let chromium = program("chromium", "chromium")?;
        let scratch = workspace_root()
            .join("target")
            .join("browser")
            .join(format!(
                "{name}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ));
        let profile = scratch.join("profile");
        let downloads = scratch.join("downloads");
        std::fs::create_dir_all(&profile)?;
        std::fs::create_dir_all(&downloads)?;
        let port = free_port()?;
        let log = std::fs::File::create(scratch.join("chromedriver.log"))?;
        let mut cmd = std::process::Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Driver {
            child: cmd.spawn().context("starting chromedriver")?,
            scratch,
        };
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("chromedriver did not answer on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "safebrowsing.enabled": false
                }
            }
        });
        let caps = caps
            .as_object()
            .cloned()
            .context("capabilities are an object")?;
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&url),
        )
        .await
        .context("starting a Chromium session timed out")?
        .context("starting a Chromium session")?;
        Ok(Self {
            client,
            downloads,
            _driver: driver,
        })
    }

    /// Saves a screenshot of the page as `target/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let dir = screenshot_dir();
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("{name}.png"));
        tokio::fs::write(&path, png).await?;
        Ok(path)
    }

    /// Text of the first element matching `css`, or `None`.
    pub async fn text(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.ok(),
            Err(_) => None,
        }
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.client.execute(script, vec![]).await?)
    }

    /// Waits for a file to be downloaded completely and returns its path.
    pub async fn downloaded(&self, within: Duration) -> anyhow::Result<PathBuf> {
        let started = Instant::now();
        loop {
            let mut done = None;
            for entry in std::fs::read_dir(&self.downloads)? {
                let path = entry?.path();
                // Chromium writes a download under a hidden temporary name
                // (`.org.chromium.Chromium.XXXXXX`), then as `.crdownload`, then renames
                // it: only a visible name without those extensions is a finished file.
                let hidden = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_none_or(|n| n.starts_with('.'));
                let partial = hidden
                    || path
                        .extension()
                        .is_some_and(|e| e == "crdownload" || e == "tmp");
                if !partial {
                    done = Some(path);
                }
            }
            if let Some(p) = done {
                return Ok(p);
            }
            if started.elapsed() > within {
                bail!("no download completed within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session, then the processes (dropping does only the latter).
    pub async fn close(self) {
        let Self {
            client,
            _driver: driver,
            ..
        } = self;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        drop(driver);
    }
}
