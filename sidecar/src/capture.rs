//! Transparent capture, as Istio's `istio-iptables` sets it up in a pod's network
//! namespace: the application's outbound TCP is redirected to 15001 and every inbound
//! connection to 15006; the sidecar learns where each was headed from
//! `SO_ORIGINAL_DST`. The sidecar's own connections carry a socket mark and are let
//! through, so they are never captured again.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where a redirected connection was going before NAT sent it to us.
pub fn original_dst(stream: &impl AsRawFd) -> io::Result<SocketAddr> {
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
}

/// What `sidecar init` installs.
#[derive(Debug, Clone, clap::Args)]
pub struct Rules {
    /// The mark on the sidecar's own sockets; marked traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub mark: u32,
    /// Where outbound connections are redirected.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Where inbound connections are redirected.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports left alone (the proxy's own: metrics, health).
    #[arg(long, value_delimiter = ',', default_value = "15090,15021,15020,15000")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination CIDRs whose outbound traffic is left alone.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Destination ports left alone: by default the controller's xDS and CA ports, because
    /// the sidecar's own control-plane connections carry no mark and must reach the
    /// controller before the sidecar listens (Istio exempts its proxy's user instead).
    #[arg(long, value_delimiter = ',', default_value = "15010,15012")]
    pub exclude_outbound_ports: Vec<u16>,
}

impl Rules {
    /// The rules in `iptables-restore` format, for the nat table, in Istio's chain names.
    pub fn restore_text(&self) -> String {
        let mut r = String::from(
            "*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n",
        );
        r += &format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        );
        r += &format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.inbound_port
        );
        r += "-A PREROUTING -p tcp -j ISTIO_INBOUND\n";
        for p in [self.inbound_port, self.outbound_port]
            .iter()
            .chain(&self.exclude_inbound_ports)
        {
            r += &format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN\n");
        }
        r += "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n";
        r += "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n";
        // The sidecar's own connections, upstream and to the application, go as they are.
        r += &format!("-A ISTIO_OUTPUT -m mark --mark {} -j RETURN\n", self.mark);
        r += "-A ISTIO_OUTPUT -o lo -d 127.0.0.1/32 -j RETURN\n";
        for cidr in &self.exclude_outbound_cidrs {
            r += &format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN\n");
        }
        for port in &self.exclude_outbound_ports {
            r += &format!("-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN\n");
        }
        r += "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
        r
    }

    /// Installs the rules in the current network namespace (replacing the nat table).
    pub fn apply(&self) -> io::Result<()> {
        let mut child = Command::new("iptables-restore")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run iptables-restore: {e}")))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(self.restore_text().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "iptables-restore failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// A TCP socket carrying `mark`, connected to `addr` (bounded by the caller's timeout).
pub async fn connect_marked(addr: SocketAddr, mark: Option<u32>) -> io::Result<tokio::net::TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_let_marked_and_excluded_traffic_through_and_redirect_the_rest() {
        let rules = Rules {
            mark: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![15090],
            exclude_outbound_cidrs: vec!["10.241.0.10/32".into()],
            exclude_outbound_ports: vec![15012],
        };
        let text = rules.restore_text();
        let lines: Vec<&str> = text.lines().collect();
        let pos = |l: &str| {
            lines
                .iter()
                .position(|x| *x == l)
                .unwrap_or_else(|| panic!("missing {l}"))
        };
        // Returns come before the redirect they exempt from.
        assert!(pos("-A ISTIO_OUTPUT -m mark --mark 1337 -j RETURN") < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(pos("-A ISTIO_OUTPUT -d 10.241.0.10/32 -j RETURN") < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(pos("-A ISTIO_OUTPUT -p tcp --dport 15012 -j RETURN") < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(
            pos("-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN")
                < pos("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        );
        assert!(pos("-A ISTIO_INBOUND -p tcp --dport 15006 -j RETURN") > 0);
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }
}
