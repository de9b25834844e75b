//! `berth pki init`: the cluster CA and the first admin credentials, for founding masters.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use berth_pki::{CertificateAuthority, Identity};
use clap::Args;

#[derive(Args)]
pub struct PkiInitArgs {
    /// Directory to write ca.crt, ca.key, admin.crt, admin.key and secrets.key into (created; must not hold a CA).
    #[arg(long)]
    pub out: PathBuf,
    /// Name in the admin certificate.
    #[arg(long, default_value = "admin")]
    pub admin_name: String,
    /// Lifetime of the admin certificate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "365days")]
    pub admin_validity: Duration,
}

/// Writes each (name, contents, secret) into `dir`, secrets readable by the owner only.
pub fn write_files(dir: &Path, files: &[(&str, &str, bool)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text, secret) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if *secret { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all())?;
    }
    Ok(())
}

/// Creates the cluster CA and an admin certificate in `out`.
pub fn init(a: &PkiInitArgs) -> Result<()> {
    if a.out.join("ca.key").exists() || a.out.join("ca.crt").exists() {
        bail!(
            "{} already holds a CA: pass another --out (a second CA would make a second, incompatible cluster)",
            a.out.display()
        );
    }
    let ca = CertificateAuthority::generate("berth")?;
    let admin = ca.issue(&Identity::admin(&a.admin_name), &[], &[], a.admin_validity)?;
    // The masters' key-encryption key for secrets at rest: never in the replicated state, so a
    // backup alone opens no secret.
    let secrets_key = hex::encode(rand::random::<[u8; 32]>()) + "\n";
    write_files(
        &a.out,
        &[
            ("ca.crt", ca.cert_pem(), false),
            ("ca.key", ca.key_pem(), true),
            ("admin.crt", &admin.cert_pem, false),
            ("admin.key", &admin.key_pem, true),
            ("secrets.key", &secrets_key, true),
        ],
    )
}
