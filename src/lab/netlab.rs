//! `ringlab netlab up|down`: network namespaces standing in for hosts on this machine — one per
//! role (client, lb, backends), each joined by a veth pair to a bridge in a namespace of its
//! own, addressed from the benchmarking range 198.18.0.0/15 (RFC 2544), with no default route.
//! Built with `ip` (iproute2), as a lab's scripts would; `down` removes exactly what `up` made
//! (deleting a namespace deletes the veth ends in it, and a veth pair dies with either end).

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;

/// The roles, each a namespace, and its address (the first client; more clients follow at
/// [`client_address`]).
pub const ROLES: [(&str, Ipv4Addr); 3] = [
    ("client", Ipv4Addr::new(198, 18, 0, 1)),
    ("lb", Ipv4Addr::new(198, 18, 0, 2)),
    ("backends", Ipv4Addr::new(198, 18, 0, 3)),
];

/// Most client namespaces `up` makes.
pub const MAX_CLIENTS: usize = 8;

/// The role name of client `k` (1-based): `client`, `client2`, `client3`, …
pub fn client_role(k: usize) -> String {
    if k <= 1 {
        "client".into()
    } else {
        format!("client{k}")
    }
}

/// The address of client `k` (1-based): 198.18.0.1, then .4, .5, … after the lb and backends.
pub fn client_address(k: usize) -> Ipv4Addr {
    if k <= 1 {
        ROLES[0].1
    } else {
        Ipv4Addr::new(198, 18, 0, 2 + k as u8)
    }
}

/// Every role of a lab with `clients` client namespaces, with its address.
pub fn roles(clients: usize) -> Vec<(String, Ipv4Addr)> {
    let mut all: Vec<(String, Ipv4Addr)> = ROLES
        .iter()
        .map(|(role, addr)| (role.to_string(), *addr))
        .collect();
    all.extend((2..=clients).map(|k| (client_role(k), client_address(k))));
    all
}

/// What each link does to packets: a rate through tbf, delay and loss through netem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shaping {
    /// tbf's (or netem's) rate, as tc writes it (`1gbit`).
    pub rate: Option<String>,
    /// netem's one-way delay (`1ms`).
    pub delay: Option<String>,
    /// netem's loss (`0.1%`).
    pub loss: Option<String>,
}

impl Shaping {
    fn is_none(&self) -> bool {
        self.rate.is_none() && self.delay.is_none() && self.loss.is_none()
    }

    /// One line for the results.
    pub fn describe(&self) -> String {
        if self.is_none() {
            return "unshaped".into();
        }
        let mut parts = Vec::new();
        if let Some(r) = &self.rate {
            parts.push(format!("rate {r}"));
        }
        if let Some(d) = &self.delay {
            parts.push(format!("delay {d}"));
        }
        if let Some(l) = &self.loss {
            parts.push(format!("loss {l}"));
        }
        let how = if self.delay.is_some() || self.loss.is_some() {
            "netem"
        } else {
            "tbf"
        };
        format!("{} per link ({how}, each direction)", parts.join(", "))
    }

    /// The `tc qdisc add … root` arguments after `root`.
    fn qdisc(&self) -> Vec<String> {
        let mut q: Vec<String> = Vec::new();
        if self.delay.is_some() || self.loss.is_some() {
            q.push("netem".into());
            if let Some(d) = &self.delay {
                q.extend(["delay".into(), d.clone()]);
            }
            if let Some(l) = &self.loss {
                q.extend(["loss".into(), l.clone()]);
            }
            if let Some(r) = &self.rate {
                q.extend(["rate".into(), r.clone()]);
            }
        } else if let Some(r) = &self.rate {
            // A burst well above one 64 KB GSO segment, so veth's large segments pass whole.
            q.extend(["tbf", "rate", r, "burst", "512kb", "latency", "20ms"].map(String::from));
        }
        q
    }
}

/// The line `up` prints where the kernel has no netem.
pub const NO_NETEM: &str = "this kernel has no sch_netem, so links take no --delay or --loss; --rate-limit RATE shapes them with tbf";

/// The namespace of a role (or of the bridge, `br`).
pub fn namespace(prefix: &str, role: &str) -> String {
    format!("{prefix}-{role}")
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

fn tc(args: &[&str]) -> io::Result<()> {
    run("tc", args)
}

/// Runs an iproute2 tool; a failure says which command and what it printed.
fn run(tool: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `{tool}` ({e}): install iproute2 (apt-get install -y iproute2)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn require_root() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "netlab makes network namespaces, veth pairs and a bridge: it needs root \
             (CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo",
        ));
    }
    Ok(())
}

/// The namespaces that exist now.
pub fn namespaces() -> io::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Builds the topology under `prefix` (at most 8 characters, so interface names fit in 15) with
/// `clients` client namespaces and each link shaped as `shaping` says; returns a note for the
/// user when the kernel lacks netem. On a failure part-way, what was made is removed again.
pub fn up(prefix: &str, clients: usize, shaping: &Shaping) -> io::Result<Option<&'static str>> {
    require_root()?;
    if prefix.is_empty() || prefix.len() > 8 || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(crate::cli::usage(format!(
            "'{prefix}': a netlab prefix is 1 to 8 letters or digits"
        )));
    }
    let existing = namespaces()?;
    if let Some(ns) = existing
        .iter()
        .find(|n| n.starts_with(&format!("{prefix}-")))
    {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("namespace {ns} exists already: `ringlab netlab down --prefix {prefix}` first"),
        ));
    }
    if !(1..=MAX_CLIENTS).contains(&clients) {
        return Err(crate::cli::usage(format!(
            "{clients} client namespaces: from 1 to {MAX_CLIENTS}"
        )));
    }
    let built = build(prefix, clients, shaping);
    if built.is_err() {
        let _ = down(prefix);
    }
    built
}

fn build(prefix: &str, clients: usize, shaping: &Shaping) -> io::Result<Option<&'static str>> {
    let br = namespace(prefix, "br");
    ip(&["netns", "add", &br])?;
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &br, "link", "set", "br0", "up"])?;
    ip(&["-n", &br, "link", "set", "lo", "up"])?;
    // A lab switch forwards frames; it does not run them through iptables. Where br_netfilter is
    // loaded (Docker loads it) its per-namespace switches default to on, and cost 4% of the
    // CPU of a proxied request here (perf, the bridge's `br_nf_*` and `nf_hook_slow`). Only the
    // bridge namespace's own settings change.
    for family in ["iptables", "ip6tables", "arptables"] {
        let file = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
        let _ = Command::new("ip")
            .args(["netns", "exec", &br, "sh", "-c"])
            .arg(format!("[ ! -e {file} ] || echo 0 > {file}"))
            .status();
    }
    let netem = has_netem(&br);
    if !netem && (shaping.delay.is_some() || shaping.loss.is_some()) {
        return Err(io::Error::new(io::ErrorKind::Unsupported, NO_NETEM));
    }
    for (i, (role, addr)) in roles(clients).iter().enumerate() {
        let ns = namespace(prefix, role);
        let (outer, inner) = (format!("{prefix}b{i}"), format!("{prefix}r{i}"));
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &outer, "netns", &br])?;
        ip(&["link", "set", &inner, "netns", &ns])?;
        ip(&["-n", &br, "link", "set", &outer, "master", "br0"])?;
        ip(&["-n", &br, "link", "set", &outer, "up"])?;
        ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        if !shaping.is_none() {
            let q = shaping.qdisc();
            let q: Vec<&str> = q.iter().map(String::as_str).collect();
            tc(&[&["-n", &ns, "qdisc", "add", "dev", "eth0", "root"], &q[..]].concat())?;
            tc(&[&["-n", &br, "qdisc", "add", "dev", &outer, "root"], &q[..]].concat())?;
        }
    }
    Ok((!netem).then_some(NO_NETEM))
}

/// Whether the kernel has netem: tried on the bridge namespace's own loopback, then removed.
fn has_netem(ns: &str) -> bool {
    let added = tc(&[
        "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms",
    ])
    .is_ok();
    if added {
        let _ = tc(&["-n", ns, "qdisc", "del", "dev", "lo", "root"]);
    }
    added
}

/// Removes every namespace `up` made under `prefix` (and with them their veth ends and the
/// bridge); says which were removed.
pub fn down(prefix: &str) -> io::Result<Vec<String>> {
    require_root()?;
    let ours: Vec<String> = roles(MAX_CLIENTS)
        .iter()
        .map(|(role, _)| namespace(prefix, role))
        .chain([namespace(prefix, "br")])
        .collect();
    let existing = namespaces()?;
    let mut removed = Vec::new();
    for ns in ours.iter().filter(|ns| existing.contains(ns)) {
        ip(&["netns", "del", ns])?;
        removed.push(ns.clone());
    }
    Ok(removed)
}
