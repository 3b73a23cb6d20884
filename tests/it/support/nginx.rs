//! A real nginx in front of three herald nodes, configured from
//! deploy/nginx-local.conf.tmpl (the twin of deploy/nginx.conf).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::node::Herald;
use super::{free_port, token, WAIT};

/// Where nginx may be when it is not on PATH (unprivileged users often lack /usr/sbin).
const NGINX_CANDIDATES: &[&str] = &["nginx", "/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx"];

/// The nginx binary: $NGINX, or the first candidate that runs. Fails the test, never skips.
pub fn nginx_bin() -> String {
    let candidates: Vec<String> = match std::env::var("NGINX") {
        Ok(bin) => vec![bin],
        Err(_) => NGINX_CANDIDATES.iter().map(|s| s.to_string()).collect(),
    };
    for bin in &candidates {
        let runs = Command::new(bin)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if runs {
            return bin.clone();
        }
    }
    panic!(
        "nginx is not installed (looked for {candidates:?}). This test needs it: run the \
         README test command, ./scripts/test.sh, which installs it with \
         `apt-get update && apt-get install -y nginx` (or set NGINX=/path/to/nginx)."
    );
}

/// One nginx process in its own run directory; killed on drop, even when the test panics
/// (the directory, with nginx's logs, is kept only then).
pub struct Nginx {
    port: u16,
    /// The internal server: the producer API.
    api_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Nginx {
    /// Writes the config from the shipped template, starts nginx in the foreground and
    /// waits until it answers. Another port is tried if the free one was taken meanwhile.
    pub async fn start(nodes: [&Herald; 3], http: &reqwest::Client) -> Nginx {
        let bin = nginx_bin();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lb = Nginx::spawn(&bin, nodes);
            match lb.wait_answering(http).await {
                Ok(()) => return lb,
                Err(logs) if attempt < 3 && logs.contains("Address already in use") => continue,
                Err(logs) => panic!("nginx on {} did not come up:\n{logs}", lb.port),
            }
        }
    }

    fn spawn(bin: &str, nodes: [&Herald; 3]) -> Nginx {
        let port = free_port();
        let api_port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("lb-nginx-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("nginx run dir");
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx-local.conf.tmpl");
        let conf = std::fs::read_to_string(&template)
            .expect("deploy/nginx-local.conf.tmpl")
            .replace("__LISTEN__", &format!("127.0.0.1:{port}"))
            .replace("__INTERNAL_LISTEN__", &format!("127.0.0.1:{api_port}"))
            .replace("__HERALD1__", &format!("127.0.0.1:{}", nodes[0].port))
            .replace("__HERALD2__", &format!("127.0.0.1:{}", nodes[1].port))
            .replace("__HERALD3__", &format!("127.0.0.1:{}", nodes[2].port));
        assert!(!conf.contains("__"), "unreplaced placeholder in {conf}");
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let out = std::fs::File::create(dir.join("nginx-stderr.log")).expect("log");
        let mut prefix = dir.display().to_string();
        prefix.push('/');
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        Nginx {
            port,
            api_port,
            dir,
            child: Some(child),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A URL on the internal server, where the producer API is.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.api_port, path)
    }

    pub fn ws_url(&self, user: &str, topics: &[&str]) -> String {
        format!(
            "ws://127.0.0.1:{}/ws?token={}",
            self.port,
            token(user, topics)
        )
    }

    fn logs(&self) -> String {
        ["nginx-stderr.log", "nginx-error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics with nginx's own logs if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("nginx exited ({status}):\n{}", self.logs());
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Polls /healthz (which nginx proxies to a node) until it is 200; on nginx's exit or
    /// after the deadline, returns its logs.
    async fn wait_answering(&mut self, http: &reqwest::Client) -> Result<(), String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("nginx exited ({status}):\n{}", self.logs()));
            }
            if let Ok(r) = http.get(self.url("/healthz")).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!("no answer within {WAIT:?}:\n{}", self.logs()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Keep the config and logs of a failed run for reading.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
