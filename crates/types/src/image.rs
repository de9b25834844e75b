//! Image references in their full form, so that the masters (which keep images imported into
//! the cluster by reference) and the agents (which keep pulled ones) agree that `busybox`,
//! `library/busybox:latest` and `docker.io/library/busybox:latest` are one image. The rules are
//! Docker's: a first component with a `.` or `:`, or `localhost`, is a registry (else
//! `docker.io`); a one-component repository on Docker Hub is under `library/`; no tag and no
//! digest means `:latest`.

/// `reference` in full form: `registry/repository[:tag][@sha256:hex]`.
pub fn normalize_reference(reference: &str) -> Result<String, String> {
    let r = reference.trim();
    let bad = |why: &str| format!("image {reference:?} is not a valid image reference: {why}");
    if r.is_empty() {
        return Err(bad("it is empty"));
    }
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").ok_or_else(|| bad("only sha256 digests are supported"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad("a digest is sha256: and 64 lowercase hex digits"));
        }
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a registry's port).
    let (path, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || t.starts_with(['.', '-'])
            || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
    {
        return Err(bad("a tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"));
    }
    let (registry, repo) = match path.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest.to_string()),
        _ => ("docker.io", path.to_string()),
    };
    let registry = if registry == "index.docker.io" { "docker.io" } else { registry };
    let repo = if registry == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo };
    if repo.is_empty()
        || repo.split('/').any(|c| {
            c.is_empty()
                || !c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                || c.starts_with(['.', '_', '-'])
                || c.ends_with(['.', '_', '-'])
        })
    {
        return Err(bad("a repository is lowercase letters, digits and separators ('.', '_', '-', '/')"));
    }
    let mut out = format!("{registry}/{repo}");
    match (tag, digest) {
        (Some(t), _) => out.push_str(&format!(":{t}")),
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push_str(&format!("@{d}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_get_docker_hub_library_and_latest() {
        assert_eq!(normalize_reference("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(normalize_reference("library/busybox:1").unwrap(), "docker.io/library/busybox:1");
        assert_eq!(normalize_reference("index.docker.io/me/app").unwrap(), "docker.io/me/app:latest");
        assert_eq!(normalize_reference("me/app:v2").unwrap(), "docker.io/me/app:v2");
    }

    #[test]
    fn registries_with_ports_and_digests_are_kept() {
        assert_eq!(normalize_reference("127.0.0.1:5000/t/busybox:1").unwrap(), "127.0.0.1:5000/t/busybox:1");
        assert_eq!(normalize_reference("localhost/app").unwrap(), "localhost/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize_reference(&format!("reg.example:5000/app@{d}")).unwrap(),
            format!("reg.example:5000/app@{d}")
        );
        assert_eq!(normalize_reference(&format!("app:1@{d}")).unwrap(), format!("docker.io/library/app:1@{d}"));
    }

    #[test]
    fn malformed_references_say_why() {
        for bad in ["", "Busybox", "app:", "app@sha256:12", "app@md5:00", "a//b", "app:-x"] {
            let e = normalize_reference(bad).unwrap_err();
            assert!(e.contains("not a valid image reference"), "{bad}: {e}");
        }
    }
}
