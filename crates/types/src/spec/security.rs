//! What a task may do: the user it runs as, its Linux capabilities, and the `privileged` escape
//! hatch (`spec.task.user`, `cap_add`, `cap_drop`, `privileged`). The agent's sandbox turns
//! these into the task's configuration; this module only names and checks them.

use super::SpecError;

/// The uid and gid a task runs as when its spec names no `user`: `nobody`.
pub const DEFAULT_USER: u32 = 65534;

/// The highest uid or gid a task may name: the task's user namespace maps 0 to 65535.
pub const MAX_ID: u32 = 65535;

/// The default number of processes (and threads) a task may have (`pids.max`), unless its spec
/// sets `resources.limits.pids`.
pub const DEFAULT_PIDS_MAX: u32 = 1024;

/// Every Linux capability, without the `CAP_` prefix, in the kernel's numbering order.
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities a task keeps by default: the set Docker (and containerd) give a container.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A task's user: `UID` or `UID:GID` (numbers; the gid defaults to the uid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl Default for User {
    fn default() -> User {
        User { uid: DEFAULT_USER, gid: DEFAULT_USER }
    }
}

impl User {
    /// Parses `spec.task.user`; the error says what is allowed.
    pub fn parse(text: &str) -> Result<User, String> {
        let id = |s: &str, what: &str| -> Result<u32, String> {
            let s = s.trim();
            match s.parse::<u32>() {
                Ok(n) if n <= MAX_ID => Ok(n),
                Ok(n) => Err(format!("{what} {n} is above {MAX_ID}, the highest id a task's user namespace maps")),
                Err(_) => Err(format!(
                    "{what} {s:?} is not a number; names are not looked up: give numbers, such as \"1000\" or \"1000:1000\""
                )),
            }
        };
        match text.split_once(':') {
            None => id(text, "uid").map(|uid| User { uid, gid: uid }),
            Some((u, g)) => Ok(User { uid: id(u, "uid")?, gid: id(g, "gid")? }),
        }
    }

    /// The task's user from its spec: [`User::parse`] of `user`, or [`DEFAULT_USER`].
    pub fn of(spec: Option<&str>) -> User {
        spec.and_then(|s| User::parse(s).ok()).unwrap_or_default()
    }
}

/// A capability name as written in a spec (`NET_ADMIN`, `CAP_NET_ADMIN`, any case, or `ALL`),
/// in canonical form without the prefix; `None` when Linux has no such capability.
pub fn capability(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    (bare == "ALL" || CAPABILITIES.contains(&bare)).then(|| bare.to_string())
}

/// The capabilities a task keeps: the default set, minus `drop`, plus `add` (`ALL` in either
/// means every capability), in the kernel's order, without the `CAP_` prefix. Names that are
/// not capabilities are skipped (validation refused them already).
pub fn effective_capabilities(add: &[String], drop: &[String]) -> Vec<&'static str> {
    let add: Vec<String> = add.iter().filter_map(|c| capability(c)).collect();
    let drop: Vec<String> = drop.iter().filter_map(|c| capability(c)).collect();
    let has = |list: &[String], c: &str| list.iter().any(|x| x == "ALL" || x == c);
    CAPABILITIES
        .iter()
        .copied()
        .filter(|c| has(&add, c) || (DEFAULT_CAPABILITIES.contains(c) && !has(&drop, c)))
        .collect()
}

/// Checks `user`, `cap_add` and `cap_drop` of a task spec.
pub(crate) fn validate(user: Option<&str>, cap_add: &[String], cap_drop: &[String]) -> Result<(), SpecError> {
    if let Some(u) = user {
        User::parse(u).map_err(|e| SpecError::invalid("spec.task.user", e))?;
    }
    for (field, list) in [("cap_add", cap_add), ("cap_drop", cap_drop)] {
        for (i, name) in list.iter().enumerate() {
            if capability(name).is_none() {
                return Err(SpecError::invalid(
                    format!("spec.task.{field}[{i}]"),
                    format!(
                        "unknown capability {name:?}; allowed: ALL or a Linux capability such as NET_ADMIN or \
                         CAP_SYS_PTRACE (see capabilities(7))"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_as_numbers_within_the_namespace() {
        assert_eq!(User::parse("1000").unwrap(), User { uid: 1000, gid: 1000 });
        assert_eq!(User::parse("0:5").unwrap(), User { uid: 0, gid: 5 });
        assert_eq!(User::default(), User { uid: 65534, gid: 65534 });
        assert!(User::parse("nginx").unwrap_err().contains("names are not looked up"));
        assert!(User::parse("70000").unwrap_err().contains("above 65535"));
        assert!(User::parse("1:x").unwrap_err().contains("gid \"x\""));
        assert_eq!(User::of(None), User::default());
        assert_eq!(User::of(Some("7")), User { uid: 7, gid: 7 });
    }

    #[test]
    fn capabilities_are_the_default_set_adjusted() {
        assert_eq!(capability("cap_net_admin").as_deref(), Some("NET_ADMIN"));
        assert_eq!(capability("all").as_deref(), Some("ALL"));
        assert_eq!(capability("CAP_FLY"), None);
        let default = effective_capabilities(&[], &[]);
        assert_eq!(default.len(), DEFAULT_CAPABILITIES.len());
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let adjusted = effective_capabilities(&s(&["NET_ADMIN"]), &s(&["CAP_NET_RAW", "mknod"]));
        assert!(adjusted.contains(&"NET_ADMIN") && !adjusted.contains(&"NET_RAW") && !adjusted.contains(&"MKNOD"));
        assert_eq!(effective_capabilities(&[], &s(&["ALL"])), Vec::<&str>::new());
        assert_eq!(effective_capabilities(&s(&["ALL"]), &[]).len(), CAPABILITIES.len());
        // Added after dropped, as Docker does: `--cap-drop ALL --cap-add KILL` keeps KILL.
        assert_eq!(effective_capabilities(&s(&["KILL"]), &s(&["ALL"])), ["KILL"]);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate(Some("1000:1000"), &["NET_ADMIN".into()], &["ALL".into()]).is_ok());
        let e = validate(None, &[], &["KILL".into(), "NOPE".into()]).unwrap_err().to_string();
        assert!(e.contains("spec.task.cap_drop[1]") && e.contains("unknown capability"), "{e}");
        let e = validate(Some("root"), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("spec.task.user"), "{e}");
    }
}
