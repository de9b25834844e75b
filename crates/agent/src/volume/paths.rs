//! Host paths: lexical normalisation and the `--allow-host-path` check. Pure, except
//! [`check_host_path`], which also asks the filesystem where a path really leads.

use std::path::{Component, Path, PathBuf};

use super::StorageError;

/// `path` made absolute and normalised without touching the filesystem: repeated and trailing
/// `/` collapse, `.` goes, `..` removes the component before it (never above `/`). `None` when
/// `path` is not absolute.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// Whether `path` is `prefix` or lies under it, compared by whole components (so `/srv/data2`
/// is not under `/srv/data`). Both must be normalised.
pub fn is_under(path: &Path, prefix: &Path) -> bool {
    path.starts_with(prefix)
}

/// The prefixes an agent was started with, normalised; a relative one is an error.
pub fn normalize_prefixes(prefixes: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    prefixes
        .iter()
        .map(|p| {
            normalize(p).ok_or_else(|| {
                format!("--allow-host-path {:?} is not an absolute path; give one such as /srv/data", p.display())
            })
        })
        .collect()
}

/// Checks a `host` volume's path against the allowed prefixes and the filesystem: it must lie
/// under one of `allowed` (normalised) both as written and once symbolic links are resolved (a
/// link under an allowed prefix must not lead out of it), and it must exist. Returns the
/// resolved path, which is what gets bound.
pub fn check_host_path(volume: &str, path: &str, allowed: &[PathBuf]) -> Result<PathBuf, StorageError> {
    let denied = |resolved: Option<PathBuf>| StorageError::HostPathNotAllowed {
        volume: volume.to_string(),
        path: path.to_string(),
        resolved,
        allowed: allowed.to_vec(),
    };
    let Some(lexical) = normalize(Path::new(path)) else {
        return Err(denied(None));
    };
    if !allowed.iter().any(|p| is_under(&lexical, p)) {
        return Err(denied(None));
    }
    let real = match std::fs::canonicalize(&lexical) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StorageError::HostPathMissing { volume: volume.to_string(), path: lexical });
        }
        Err(e) => return Err(StorageError::io("resolving", &lexical, e)),
    };
    let inside = allowed.iter().any(|p| {
        let real_prefix = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        is_under(&real, &real_prefix)
    });
    if !inside {
        return Err(denied(Some(real)));
    }
    Ok(real)
}

/// Whether `name` can be one path component of the agent's own directories: a namespace, a
/// volume or a task id (1-253 letters, digits, `-`, `_`, `.`, not starting with `.`).
pub fn is_component(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Option<String> {
        normalize(Path::new(p)).map(|p| p.display().to_string())
    }

    #[test]
    fn normalisation_is_lexical() {
        assert_eq!(n("/srv//data/"), Some("/srv/data".into()));
        assert_eq!(n("/srv/./data/x/.."), Some("/srv/data".into()));
        assert_eq!(n("/../../etc"), Some("/etc".into()));
        assert_eq!(n("/"), Some("/".into()));
        assert_eq!(n("srv/data"), None);
        assert_eq!(n(""), None);
    }

    #[test]
    fn prefixes_compare_whole_components() {
        let p = |s: &str| normalize(Path::new(s)).unwrap();
        assert!(is_under(&p("/srv/data"), &p("/srv/data")));
        assert!(is_under(&p("/srv/data/a/b"), &p("/srv/data/")));
        assert!(!is_under(&p("/srv/data2"), &p("/srv/data")));
        assert!(!is_under(&p("/srv/data/../other"), &p("/srv/data")));
        assert!(is_under(&p("/anything"), &p("/")));
        assert!(normalize_prefixes(&["relative".into()]).unwrap_err().contains("not an absolute path"));
        assert_eq!(normalize_prefixes(&["/srv/x/".into()]).unwrap(), vec![PathBuf::from("/srv/x")]);
    }

    #[test]
    fn host_paths_outside_the_prefixes_or_missing_or_escaping_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let allowed_dir = root.join("data");
        std::fs::create_dir_all(allowed_dir.join("app")).unwrap();
        std::fs::create_dir_all(root.join("data2")).unwrap();
        std::fs::create_dir_all(root.join("secret")).unwrap();
        std::os::unix::fs::symlink(root.join("secret"), allowed_dir.join("escape")).unwrap();
        let allowed = vec![allowed_dir.clone()];
        let s = |p: &Path| p.display().to_string();

        assert_eq!(check_host_path("v", &s(&allowed_dir.join("app")), &allowed).unwrap(), allowed_dir.join("app"));
        let e = check_host_path("v", &s(&root.join("data2")), &allowed).unwrap_err().to_string();
        assert!(e.contains("volume v") && e.contains("data2") && e.contains(&s(&allowed_dir)), "{e}");
        assert!(e.contains("--allow-host-path"), "{e}");
        let e = check_host_path("v", &s(&allowed_dir.join("none")), &allowed).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_host_path("v", &s(&allowed_dir.join("escape")), &allowed).unwrap_err().to_string();
        assert!(e.contains("resolves to") && e.contains("secret"), "{e}");
        let e = check_host_path("v", &format!("{}/../secret", s(&allowed_dir)), &allowed).unwrap_err().to_string();
        assert!(e.contains("not under"), "{e}");
        let e = check_host_path("v", "/etc", &[]).unwrap_err().to_string();
        assert!(e.contains("allows no host paths"), "{e}");
    }

    #[test]
    fn components() {
        for ok in ["default", "db-1", "a.b_c", "3f2c"] {
            assert!(is_component(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "a b", "a\0"] {
            assert!(!is_component(bad), "{bad:?}");
        }
    }
}
