//! Private MariaDB and broker processes for tests that stop and restart them. Never stop the
//! shared services that `scripts/test` provides: other tests use them at the same time.
//!
//! Each service lives in its own temporary directory on its own loopback port and is stopped
//! when dropped. Every wait is bounded.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DB_USER: &str = "gateway";
const DB_PASSWORD: &str = "private-test-only";

/// A free loopback port (free when this returns; the services bind it soon after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

fn wait_port(port: u16, limit: Duration, what: &str, log: &Path) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} should listen on 127.0.0.1:{port} within {limit:?}; log:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `limit`.
fn stop_child(child: &mut Child, limit: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A `mariadbd` with its own data directory, port and socket.
pub struct PrivateMariadb {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateMariadb {
    /// Initialises a data directory, starts the server and creates the gateway's user.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for MariaDB");
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            install.arg("--user=root");
        }
        let status = install
            .status()
            .expect("run mariadb-install-db (is MariaDB installed?)");
        assert!(
            status.success(),
            "mariadb-install-db should initialise the data directory"
        );
        let mut db = Self {
            dir,
            port: free_port(),
            child: None,
        };
        db.resume();
        db.sql(&format!(
            "CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; \
             GRANT ALL ON *.* TO '{DB_USER}'@'127.0.0.1'; CREATE DATABASE api_notify;"
        ));
        db
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadb.sock")
    }

    /// The gateway's connection URL.
    pub fn url(&self) -> String {
        format!(
            "mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{}/api_notify",
            self.port
        )
    }

    /// Starts the server on the same data directory and port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "MariaDB is already running");
        let log = self.dir.path().join("error.log");
        let mut cmd = Command::new("mariadbd");
        cmd.arg("--no-defaults")
            .arg(format!(
                "--datadir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mariadb.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--innodb-buffer-pool-size=32M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            cmd.arg("--user=root");
        }
        self.child = Some(cmd.spawn().expect("start mariadbd"));
        wait_port(self.port, Duration::from_secs(60), "private MariaDB", &log);
    }

    /// Stops the server (clean shutdown, bounded).
    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(30));
        }
    }

    fn sql(&self, statements: &str) {
        let status = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "-e", statements])
            .status()
            .expect("run the mariadb client");
        assert!(
            status.success(),
            "the private MariaDB should accept: {statements}"
        );
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.pause();
    }
}

/// A tansu broker with its own storage directory and port.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    pub fn start() -> Self {
        let mut broker = Self {
            dir: tempfile::tempdir().expect("temporary directory for the broker"),
            port: free_port(),
            child: None,
        };
        broker.resume();
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker on the same storage and port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = self.dir.path().join("broker.log");
        let child = Command::new("tansu")
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("broker log file"))
            .spawn()
            .expect("start tansu (scripts/test installs it)");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(30), "private broker", &log);
    }

    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.pause();
    }
}
