//! Network hosts for tests: Linux network namespaces the test makes (`ip netns`, as root),
//! one per host, each with a veth pair to a bridge in a namespace of its own, on
//! 10.231.0.0/24; and a TCP proxy that runs inside one of them and makes a path slow and
//! lossy (delay, throttling, connections cut), for kernels without the `netem` qdisc. No
//! traffic leaves the namespaces; [`Namespaces`] deletes them when dropped, also when a test
//! fails.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The hosts of one test.
#[derive(Debug)]
pub struct Namespaces {
    prefix: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Namespaces {
    /// Makes one namespace per name in `hosts` (host `i` at 10.231.0.`i + 1`), joined by a
    /// bridge in a further namespace.
    pub fn create(hosts: &[&str]) -> io::Result<Namespaces> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "f{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Namespaces {
            prefix,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        // Dropped (and so cleaned up) on any error below.
        let sw = ns.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, _) in hosts.iter().enumerate() {
            let name = ns.name_at(i);
            let (outer, inner) = ns.veth(i);
            ip(&["netns", "add", &name])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &outer, "netns", &sw])?;
            ip(&["link", "set", &inner, "netns", &name])?;
            ip(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"])?;
            let addr = format!("{}/24", Self::addr(i));
            ip(&["-n", &name, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &name, "link", "set", &inner, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    fn name_at(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Interface names (at most 15 characters): the bridge's end and the host's end.
    fn veth(&self, i: usize) -> (String, String) {
        (
            format!("{}v{i}s", self.prefix),
            format!("{}v{i}h", self.prefix),
        )
    }

    fn addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, 0, i as u8 + 1)
    }

    /// The namespace's name of `host`.
    pub fn name(&self, host: &str) -> String {
        self.name_at(self.index(host))
    }

    /// `host`'s address.
    pub fn ip(&self, host: &str) -> Ipv4Addr {
        Self::addr(self.index(host))
    }

    /// `program` to run inside `host` (`ip netns exec`).
    pub fn command(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name(host)]).arg(program);
        c
    }

    /// Sets `host`'s link to the bridge up or down (down: a partition of that host).
    pub fn link(&self, host: &str, up: bool) -> io::Result<()> {
        let (outer, _) = self.veth(self.index(host));
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &outer,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            let _ = ip(&["netns", "del", &self.name_at(i)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

/// How the proxy spoils its path.
#[derive(Debug, Clone, Copy)]
pub struct ProxyFaults {
    /// Added before each chunk is passed on.
    pub delay: Duration,
    /// Throughput cap per direction.
    pub bytes_per_sec: u64,
    /// Of the connections that move `cut_after_bytes`, the first and every this-many-th
    /// after it is cut at that point (0: none). Counting the connections that get that
    /// far, not every connection, makes the cuts depend only on the traffic: a short
    /// connection (a handshake, a poll) never uses up a cut.
    pub cut_one_in: u64,
    /// How many bytes (both ways together) a connection moves before it may be cut.
    pub cut_after_bytes: u64,
}

/// A TCP proxy on the loopback of one host, forwarding to an address reachable from there.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    cuts: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts the proxy inside `host` of `ns`, forwarding to `upstream` (`ADDR:PORT`).
    pub fn start(
        ns: &Namespaces,
        host: &str,
        upstream: &str,
        faults: ProxyFaults,
    ) -> io::Result<Proxy> {
        let path = format!("/var/run/netns/{}", ns.name(host));
        let upstream = upstream.to_string();
        let cuts = Arc::new(AtomicU64::new(0));
        let counted = cuts.clone();
        let crossed = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<u16>>();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let entered = std::fs::File::open(&path).and_then(|f| {
                // SAFETY: setns on this thread only, with a namespace file descriptor that
                // stays open for the call; every socket this thread makes from here on is
                // the namespace's.
                match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                    0 => Ok(()),
                    _ => Err(io::Error::last_os_error()),
                }
            });
            if let Err(e) = entered {
                let _ = tx.send(Err(e));
                return;
            }
            // One thread, one runtime: every connection is made on this thread, in the
            // namespace.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(listener.local_addr().map(|a| a.port()));
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let tally = Tally {
                        cuts: counted.clone(),
                        crossed: crossed.clone(),
                        moved: Arc::new(AtomicU64::new(0)),
                    };
                    tokio::spawn(relay(inbound, outbound, faults, tally));
                }
            });
        });
        let port = rx
            .recv()
            .map_err(|_| io::Error::other("the proxy thread ended"))??;
        Ok(Proxy { port, cuts })
    }

    /// Its port on the host's loopback.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections it cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

/// What one connection shares with its two directions and with the proxy.
#[derive(Clone)]
struct Tally {
    /// Connections cut, over the proxy's life.
    cuts: Arc<AtomicU64>,
    /// Connections that reached the cut threshold, over the proxy's life.
    crossed: Arc<AtomicU64>,
    /// Bytes this connection moved, both ways.
    moved: Arc<AtomicU64>,
}

impl Tally {
    /// Counts `n` more bytes; whether the connection is to be cut now. The connection
    /// crosses the threshold once (in whichever direction gets there), and is cut if it
    /// is the first, or a `cut_one_in`-th, to do so.
    fn passed(&self, n: u64, faults: &ProxyFaults) -> bool {
        let before = self.moved.fetch_add(n, Ordering::Relaxed);
        let limit = faults.cut_after_bytes;
        if faults.cut_one_in == 0 || before >= limit || before + n < limit {
            return false;
        }
        let k = self.crossed.fetch_add(1, Ordering::Relaxed);
        let cut = k.is_multiple_of(faults.cut_one_in);
        if cut {
            self.cuts.fetch_add(1, Ordering::Relaxed);
        }
        cut
    }
}

/// Passes bytes both ways with `faults`. A direction that ends normally half-closes its
/// side and waits for the other; a cut ends both ways at once (the sockets are dropped on
/// return).
async fn relay(
    inbound: tokio::net::TcpStream,
    outbound: tokio::net::TcpStream,
    faults: ProxyFaults,
    tally: Tally,
) {
    let (mut ir, mut iw) = inbound.into_split();
    let (mut or, mut ow) = outbound.into_split();
    let up = pipe(&mut ir, &mut ow, faults, tally.clone());
    let down = pipe(&mut or, &mut iw, faults, tally);
    tokio::pin!(up, down);
    tokio::select! {
        cut = &mut up => if !cut { down.await; },
        cut = &mut down => if !cut { up.await; },
    }
}

/// Copies `from` to `to` slowly; returns whether it stopped because of the cut.
async fn pipe(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    faults: ProxyFaults,
    tally: Tally,
) -> bool {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return false;
            }
            Ok(n) => n,
        };
        tokio::time::sleep(faults.delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
        let cut = tally.passed(n as u64, &faults);
        if faults.bytes_per_sec > 0 {
            tokio::time::sleep(Duration::from_secs_f64(
                n as f64 / faults.bytes_per_sec as f64,
            ))
            .await;
        }
        if cut {
            let _ = to.shutdown().await;
            return true;
        }
    }
}
