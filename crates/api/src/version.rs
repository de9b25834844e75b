//! berth's version-skew policy, checked wherever two berth processes meet on the wire.
//!
//! - **Masters**: versions N and N+1 (by minor version, same major) run together, so a cluster is
//!   upgraded one master at a time. A master refuses Raft messages from a master further apart.
//! - **Agents**: the same minor version as the masters or one behind, never ahead: upgrade the
//!   masters first, then the agents. The leader refuses a join or a session from an agent outside
//!   that, and says which to upgrade.
//!
//! A peer that sends no version predates this policy: it is taken as 0.1.0, the last release
//! without it.

/// This build's version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a peer that sends no version is taken to be.
const UNVERSIONED: &str = "0.1.0";

/// A `major.minor.patch` version (pre-release and build suffixes are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version, String> {
        let s = if s.is_empty() { UNVERSIONED } else { s };
        let core = s.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(|p| p.parse::<u64>());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Ok(Version { major, minor, patch }),
            _ => Err(format!("{s:?} is not a version (MAJOR.MINOR.PATCH)")),
        }
    }

    pub fn this() -> Version {
        Version::parse(VERSION).expect("the crate's own version parses")
    }

    /// How many minor versions `self` is ahead of `other` (negative: behind); None across majors.
    fn minor_ahead_of(&self, other: &Version) -> Option<i64> {
        (self.major == other.major).then(|| self.minor as i64 - other.minor as i64)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether an agent of version `agent` may join or hold a session with a master of `master`.
pub fn agent_allowed(agent: &str, master: &Version) -> Result<(), String> {
    let a = Version::parse(agent).map_err(|e| format!("the agent's version {e}"))?;
    match a.minor_ahead_of(master) {
        Some(0 | -1) => Ok(()),
        Some(n) if n > 0 => Err(format!(
            "agent version {a} is newer than the leader's {master}: upgrade the masters first (agents may be at \
             most one minor version behind the masters, never ahead)"
        )),
        _ => Err(format!(
            "agent version {a} is too old for the leader's {master}: upgrade this agent (agents may be at most one \
             minor version behind the masters)"
        )),
    }
}

/// Whether a master of version `peer` may exchange Raft messages with one of `me`.
pub fn master_allowed(peer: &str, me: &Version) -> Result<(), String> {
    let p = Version::parse(peer).map_err(|e| format!("the master's version {e}"))?;
    match p.minor_ahead_of(me) {
        Some(-1..=1) => Ok(()),
        _ => Err(format!(
            "master version {p} cannot run with this master's {me}: masters of versions N and N+1 run together, so \
             upgrade one minor version at a time"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_parse() {
        assert_eq!(v("1.2.3"), Version { major: 1, minor: 2, patch: 3 });
        assert_eq!(v("1.2.3-rc.1+abc"), v("1.2.3"));
        assert_eq!(v(""), v("0.1.0"), "a peer without a version predates the policy");
        assert!(
            Version::parse("1.2").is_err() && Version::parse("x.y.z").is_err() && Version::parse("1.2.3.4").is_err()
        );
        assert!(Version::this() >= v("0.1.0"));
    }

    #[test]
    fn agents_may_be_one_minor_behind_never_ahead() {
        let m = v("1.5.2");
        assert!(agent_allowed("1.5.0", &m).is_ok());
        assert!(agent_allowed("1.5.9", &m).is_ok(), "patch versions do not matter");
        assert!(agent_allowed("1.4.7", &m).is_ok());
        let old = agent_allowed("1.3.0", &m).unwrap_err();
        assert!(old.contains("too old") && old.contains("upgrade this agent"), "{old}");
        let new = agent_allowed("1.6.0", &m).unwrap_err();
        assert!(new.contains("newer") && new.contains("upgrade the masters first"), "{new}");
        assert!(agent_allowed("2.5.0", &m).is_err() && agent_allowed("0.5.0", &m).is_err(), "another major");
        assert!(agent_allowed("garbage", &m).unwrap_err().contains("not a version"));
    }

    #[test]
    fn masters_run_with_one_minor_either_side() {
        let me = v("1.5.0");
        for ok in ["1.4.0", "1.5.3", "1.6.0"] {
            assert!(master_allowed(ok, &me).is_ok(), "{ok}");
        }
        for bad in ["1.3.9", "1.7.0", "2.5.0"] {
            assert!(master_allowed(bad, &me).unwrap_err().contains("one minor version at a time"), "{bad}");
        }
    }
}
