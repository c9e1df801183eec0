//! `--database-url`: which backend, and where. Parsed (and refused) before anything starts.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where an app's database is: `sqlite://PATH` or `postgres://USER[:PASSWORD]@HOST:PORT/DB`.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// A SQLite file, created on first start.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgresql://` is accepted too). The original text is kept to
    /// show it with its password hidden.
    Postgres {
        config: Box<tokio_postgres::Config>,
        shown: String,
    },
}

impl DatabaseUrl {
    /// A SQLite file at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::Sqlite(path.into())
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(format!(
                    "{s:?} names no file: write sqlite://PATH, e.g. sqlite://./user.db"
                ));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let shown = hide_password(s);
            let config: tokio_postgres::Config = s
                .parse()
                .map_err(|e| format!("{shown:?} is not a PostgreSQL URL: {e}"))?;
            if config.get_hosts().is_empty() {
                return Err(format!(
                    "{shown:?} names no host: write postgres://USER@HOST:PORT/DATABASE"
                ));
            }
            return Ok(Self::Postgres {
                config: Box::new(config),
                shown,
            });
        }
        Err(format!(
            "{:?} is neither sqlite://PATH nor postgres://USER@HOST:PORT/DATABASE",
            hide_password(s)
        ))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres { shown, .. } => f.write_str(shown),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db`, so a URL can be logged.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_and_postgres_urls() {
        let sqlite: DatabaseUrl = "sqlite://./user.db".parse().unwrap();
        assert!(matches!(&sqlite, DatabaseUrl::Sqlite(p) if p == &PathBuf::from("./user.db")));
        assert_eq!(sqlite.to_string(), "sqlite://./user.db");
        let absolute: DatabaseUrl = "sqlite:///var/lib/shop/user.db".parse().unwrap();
        assert!(
            matches!(&absolute, DatabaseUrl::Sqlite(p) if p == &PathBuf::from("/var/lib/shop/user.db"))
        );

        let pg: DatabaseUrl = "postgres://shop:s3cret@127.0.0.1:5433/user"
            .parse()
            .unwrap();
        let DatabaseUrl::Postgres { config, .. } = &pg else {
            panic!("not postgres: {pg}");
        };
        assert_eq!(config.get_dbname(), Some("user"));
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(pg.to_string(), "postgres://shop:***@127.0.0.1:5433/user");
        assert!(
            "postgresql://shop@localhost/order"
                .parse::<DatabaseUrl>()
                .is_ok()
        );
    }

    #[test]
    fn malformed_urls_say_what_is_expected() {
        for (url, says) in [
            ("./user.db", "neither sqlite://PATH nor postgres://"),
            ("sqlite://", "names no file"),
            ("mysql://a@b/c", "neither sqlite://PATH"),
            ("postgres://a@b:notaport/c", "is not a PostgreSQL URL"),
            ("postgres:///c", "names no host"),
        ] {
            let error = url.parse::<DatabaseUrl>().expect_err(url);
            assert!(error.contains(says), "{url}: {error}");
        }
        let error = "postgres://a:hunter2@b:x/c"
            .parse::<DatabaseUrl>()
            .unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }
}
