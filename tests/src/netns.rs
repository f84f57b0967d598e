//! Network namespaces that exist for one test.
//!
//! A test that changes the network (drops packets, changes the MTU) does it
//! in a namespace of its own, with `lo` up, so nothing outside it is
//! touched: all of its traffic goes over that namespace's loopback. Removed
//! on drop.
//!
//! Does not own: which processes run inside (`env` prefixes their commands
//! with [`NetNs::command`]).

use std::{
    ffi::OsStr,
    process::{Command, Output},
};

/// A named namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback up; a leftover of the
    /// same name is deleted first.
    pub fn create(name: &str) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ok(Command::new("ip").args(["netns", "add", name]));
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.run_ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program args...` to be run inside the namespace. `ip netns exec`
    /// execs the program (no fork), so the child's pid is the program's.
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).arg(program);
        cmd.args(args);
        cmd
    }

    /// Runs `program args...` inside the namespace; panics unless it succeeds.
    /// Returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        run_ok(&mut self.command(program, args))
    }

    /// A counter of the namespace's TCP MIB (/proc/net/snmp, e.g.
    /// `RetransSegs`), read from inside it.
    pub fn tcp_counter(&self, name: &str) -> u64 {
        let snmp = self.run_ok("cat", &["/proc/net/snmp"]);
        snmp_counter(&snmp, "Tcp:", name)
            .unwrap_or_else(|| panic!("no Tcp {name} in /proc/net/snmp of {}:\n{snmp}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cannot delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs a command, panics with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Value of `field` in the `section` table of /proc/net/snmp, whose tables
/// are a header line of names followed by a line of values.
fn snmp_counter(snmp: &str, section: &str, field: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(section));
    let names = lines.next()?;
    let values = lines.next()?;
    let index = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::snmp_counter;

    #[test]
    fn snmp_table_is_read_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens RetransSegs\nTcp: 1 17 42\n";
        assert_eq!(snmp_counter(snmp, "Tcp:", "RetransSegs"), Some(42));
        assert_eq!(snmp_counter(snmp, "Tcp:", "ActiveOpens"), Some(17));
        assert_eq!(snmp_counter(snmp, "Udp:", "InDatagrams"), None);
    }
}
