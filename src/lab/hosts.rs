//! Where a role runs: a host is a command prefix that starts `ringlab` there — this machine, a
//! network namespace on it (`ip netns exec`), or another machine over OpenSSH — plus the address
//! the other roles reach it at. No daemon of ours: the tools a lab already has.

use std::io;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::lab::machine::Machine;

/// The roles a sweep places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The four backends (and the direct and threaded servers, on the first backends host).
    Backends,
    /// The balancers.
    Lb,
    /// The load generators.
    Client,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Backends => "backends",
            Role::Lb => "lb",
            Role::Client => "client",
        })
    }
}

/// How to reach a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Reach {
    /// This machine: run the binary directly.
    Local,
    /// A network namespace on this machine: `ip netns exec NAME`.
    Netns(String),
    /// Another machine: `ssh -o BatchMode=yes [USER@]HOST`.
    Ssh(String),
}

/// A host: how to start a command there, and the address other roles use for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// How to reach it.
    pub reach: Reach,
    /// The address given after `/`, if any; else [`Host::address`] finds one.
    pub addr: Option<IpAddr>,
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reach {
            Reach::Local => f.write_str("local")?,
            Reach::Netns(n) => write!(f, "netns:{n}")?,
            Reach::Ssh(d) => write!(f, "ssh:{d}")?,
        }
        match self.addr {
            Some(a) => write!(f, "/{a}"),
            None => Ok(()),
        }
    }
}

impl Host {
    /// This machine, reached at 127.0.0.1.
    pub fn local() -> Host {
        Host {
            reach: Reach::Local,
            addr: None,
        }
    }

    /// Parses `local[/IP]`, `netns:NAME[/IP]` or `ssh:[USER@]HOST[/IP]`.
    pub fn parse(s: &str) -> Result<Host, String> {
        let (spec, addr) = match s.rsplit_once('/') {
            Some((spec, ip)) => {
                let ip: IpAddr = ip.parse().map_err(|_| {
                    format!(
                        "'{s}': after '/' comes the host's IP address, e.g. ssh:lab@lb1/10.0.0.2"
                    )
                })?;
                (spec, Some(ip))
            }
            None => (s, None),
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && !n.starts_with('-')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@:[]".contains(c))
        };
        let reach = if spec == "local" {
            Reach::Local
        } else if let Some(name) = spec.strip_prefix("netns:") {
            if !name_ok(name) || name.contains(['@', ':']) {
                return Err(format!(
                    "'{s}': netns:NAME takes a namespace name, e.g. netns:rl-lb"
                ));
            }
            Reach::Netns(name.to_string())
        } else if let Some(dest) = spec.strip_prefix("ssh:") {
            if !name_ok(dest) {
                return Err(format!(
                    "'{s}': ssh:[USER@]HOST takes an ssh destination, e.g. ssh:lab@10.0.0.2"
                ));
            }
            Reach::Ssh(dest.to_string())
        } else {
            return Err(format!(
                "'{s}' is not a host; use local, netns:NAME or ssh:[USER@]HOST (each optionally \
                 /IP)"
            ));
        };
        Ok(Host { reach, addr })
    }

    /// The address other roles reach this host at: the one given, else 127.0.0.1 for this
    /// machine, the namespace's first global IPv4 address, or the ssh host name resolved here.
    pub fn address(&self) -> io::Result<IpAddr> {
        if let Some(a) = self.addr {
            return Ok(a);
        }
        match &self.reach {
            Reach::Local => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Reach::Netns(name) => {
                let out = Command::new("ip")
                    .args(["-n", name, "-4", "-o", "addr", "show", "scope", "global"])
                    .output()?;
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .skip_while(|w| *w != "inet")
                    .nth(1)
                    .and_then(|a| a.split('/').next()?.parse().ok())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!(
                                "netns:{name} has no IPv4 address (does the namespace exist? `ip \
                                 netns list`); give one as netns:{name}/IP"
                            ),
                        )
                    })
            }
            Reach::Ssh(dest) => {
                let host = dest.rsplit_once('@').map_or(dest.as_str(), |(_, h)| h);
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                (bare, 0)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .map(|a| a.ip())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!(
                                "cannot resolve ssh host '{host}' here; give its address as \
                                 ssh:{dest}/IP"
                            ),
                        )
                    })
            }
        }
    }

    /// Whether the host is this machine or a namespace on it (so its processes can be watched
    /// from here, and its CPUs are this machine's).
    pub fn is_this_machine(&self) -> bool {
        !matches!(self.reach, Reach::Ssh(_))
    }

    /// A command that runs `ringlab ARGS` on this host: `local_bin` here and in namespaces,
    /// `remote_bin` over ssh. Over ssh the arguments are quoted for the remote shell, which
    /// `exec`s ringlab so that closing ssh's standard input reaches ringlab's.
    pub fn command(
        &self,
        local_bin: &std::path::Path,
        remote_bin: &str,
        args: &[String],
    ) -> Command {
        match &self.reach {
            Reach::Local => {
                let mut c = Command::new(local_bin);
                c.args(args);
                c
            }
            Reach::Netns(name) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", name]).arg(local_bin).args(args);
                c
            }
            Reach::Ssh(dest) => {
                let mut c = Command::new("ssh");
                let remote = std::iter::once(remote_bin)
                    .chain(args.iter().map(String::as_str))
                    .map(shell_quote)
                    .collect::<Vec<_>>()
                    .join(" ");
                c.args(ssh_options())
                    .arg("--")
                    .arg(dest)
                    .arg(format!("exec {remote}"));
                c
            }
        }
    }

    /// The facts `ringlab machine` reports on this host.
    pub fn facts(&self, local_bin: &std::path::Path, remote_bin: &str) -> io::Result<Machine> {
        let out = self
            .command(
                local_bin,
                remote_bin,
                &["machine".into(), "--format".into(), "json".into()],
            )
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.cannot_start(e))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "`ringlab machine` on {self} failed: {}",
                last_line(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "`ringlab machine` on {self} printed no facts ({e}); is ringlab there as new \
                     as this one? (`--remote-bin PATH`)"
                ),
            )
        })
    }

    /// The error for a command that would not start here (no `ip`, no `ssh`).
    pub fn cannot_start(&self, e: io::Error) -> io::Error {
        let tool = match self.reach {
            Reach::Local => "ringlab",
            Reach::Netns(_) => "ip (apt-get install -y iproute2)",
            Reach::Ssh(_) => "ssh (apt-get install -y openssh-client)",
        };
        io::Error::new(e.kind(), format!("cannot start {tool} for {self}: {e}"))
    }
}

/// OpenSSH options: batch mode (a key or agent, never a password prompt that would hang the
/// sweep), no terminal (so end-of-file on standard input reaches the remote command), and a
/// bounded connect.
fn ssh_options() -> [&'static str; 5] {
    ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-T"]
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The last non-empty line of a command's output, for an error message.
pub fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

/// Parses `--place ROLE=HOST[,HOST…]`.
pub fn parse_place(s: &str) -> Result<(Role, Vec<Host>), String> {
    let (role, hosts) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': write ROLE=HOST, e.g. lb=netns:rl-lb or client=local"))?;
    let role = match role.trim() {
        "backends" | "backend" => Role::Backends,
        "lb" => Role::Lb,
        "client" | "clients" => Role::Client,
        other => {
            return Err(format!(
                "'{other}' is not a role; the roles are backends, lb and client"
            ));
        }
    };
    let hosts = hosts
        .split(',')
        .map(|h| Host::parse(h.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if role == Role::Lb && hosts.len() > 1 {
        return Err(format!("'{s}': the balancer runs on one host"));
    }
    Ok((role, hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_with_and_without_an_address() {
        assert_eq!(Host::parse("local").unwrap(), Host::local());
        let h = Host::parse("ssh:lab@lb1/10.0.0.2").unwrap();
        assert_eq!(h.reach, Reach::Ssh("lab@lb1".into()));
        assert_eq!(h.addr, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(h.to_string(), "ssh:lab@lb1/10.0.0.2");
        assert_eq!(
            Host::parse("netns:rl-lb").unwrap().reach,
            Reach::Netns("rl-lb".into())
        );
        for bad in [
            "",
            "lb1",
            "ssh:",
            "ssh:-oProxyCommand=x",
            "netns:a b",
            "local/x",
        ] {
            assert!(Host::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_arguments_survive_the_remote_shell() {
        assert_eq!(shell_quote("--listen"), "--listen");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        let h = Host::parse("ssh:me@box").unwrap();
        let c = h.command(
            std::path::Path::new("/x"),
            "/opt/ringlab",
            &["bench".into(), "-H".into(), "X: a b".into()],
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "ssh");
        assert!(args.contains(&"BatchMode=yes".to_string()));
        assert_eq!(args.last().unwrap(), "exec /opt/ringlab bench -H 'X: a b'");
    }

    #[test]
    fn places_name_a_role_and_hosts() {
        let (role, hosts) = parse_place("client=netns:a,netns:b").unwrap();
        assert_eq!(role, Role::Client);
        assert_eq!(hosts.len(), 2);
        assert!(parse_place("lb=local,local").is_err());
        assert!(parse_place("db=local").is_err());
        assert!(parse_place("lb").is_err());
    }
}
