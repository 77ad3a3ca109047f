//! Logging set-up: LOG_LEVEL (DEBUG, INFO, WARNING, ERROR, or RUST_LOG syntax)
//! into a tracing `EnvFilter`, text or JSON lines on stderr. Colour codes
//! only when stderr is a terminal: a journal or a job's log file gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Turns ollama_proxy's level names into a filter; anything else is taken as
/// RUST_LOG syntax (`corral=debug,hyper=info`).
pub fn filter_for(level: &str) -> Result<EnvFilter, String> {
    let directive = match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" | "" => "info",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" => "error",
        _ => level.trim(),
    };
    EnvFilter::try_new(directive)
        .map_err(|e| format!("LOG_LEVEL '{level}' is not a level or a filter: {e}"))
}

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = filter_for(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // Already installed (a test harness did it first) is fine.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_level_names_and_filters_are_accepted() {
        for level in [
            "DEBUG",
            "info",
            "WARNING",
            "ERROR",
            "corral=debug,hyper=warn",
        ] {
            assert!(filter_for(level).is_ok(), "{level}");
        }
        assert!(filter_for("corral=loud").is_err());
    }
}
