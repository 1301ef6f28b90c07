//! `ringlab netlab up|down`: network namespaces standing in for hosts on this machine — one per
//! role (client, lb, backends), each joined by a veth pair to a bridge in a namespace of its
//! own, addressed from the benchmarking range 198.18.0.0/15 (RFC 2544), with no default route.
//! Built with `ip` (iproute2), as a lab's scripts would; `down` removes exactly what `up` made
//! (deleting a namespace deletes the veth ends in it, and a veth pair dies with either end).

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;

/// The roles, each a namespace, and its address.
pub const ROLES: [(&str, Ipv4Addr); 3] = [
    ("client", Ipv4Addr::new(198, 18, 0, 1)),
    ("lb", Ipv4Addr::new(198, 18, 0, 2)),
    ("backends", Ipv4Addr::new(198, 18, 0, 3)),
];

/// The namespace of a role (or of the bridge, `br`).
pub fn namespace(prefix: &str, role: &str) -> String {
    format!("{prefix}-{role}")
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `ip` ({e}): install iproute2 (apt-get install -y iproute2)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
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

/// Builds the topology under `prefix` (at most 8 characters, so interface names fit in 15).
/// On a failure part-way, what was made is removed again.
pub fn up(prefix: &str) -> io::Result<()> {
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
    let built = build(prefix);
    if built.is_err() {
        let _ = down(prefix);
    }
    built
}

fn build(prefix: &str) -> io::Result<()> {
    let br = namespace(prefix, "br");
    ip(&["netns", "add", &br])?;
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &br, "link", "set", "br0", "up"])?;
    ip(&["-n", &br, "link", "set", "lo", "up"])?;
    for (i, (role, addr)) in ROLES.iter().enumerate() {
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
    }
    Ok(())
}

/// Removes every namespace `up` made under `prefix` (and with them their veth ends and the
/// bridge); says which were removed.
pub fn down(prefix: &str) -> io::Result<Vec<String>> {
    require_root()?;
    let ours: Vec<String> = ROLES
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
