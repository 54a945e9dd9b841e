//! Process identities. Every process start gets a fresh one (hostname, pid, random
//! suffix): apalis refuses a worker name it has seen recently, and reusing names would
//! defeat orphan recovery.

/// The machine's hostname, or `unknown`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// `role@hostname:pid:suffix`, unique per process start.
pub fn process_identity(role: &str) -> String {
    let suffix: String = (0..6).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
    format!("{role}@{}:{}:{suffix}", hostname(), std::process::id())
}
