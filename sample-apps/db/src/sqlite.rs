//! The SQLite backend: one connection to the app's file, used on tokio's blocking pool.
//!
//! One connection rather than a pool: SQLite serialises writers anyway, and the shop's apps are
//! small. Replicas may share the file (the two `user` replicas do): a statement waits for
//! another process's write lock instead of failing, and migrations run under the write lock.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, TransactionBehavior, params_from_iter};

use crate::{DatabaseUrl, DbError, Migration, Row, Statement, Value};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Sqlite {
    url: String,
    path: PathBuf,
    conn: Arc<OnceLock<Mutex<Connection>>>,
}

impl Sqlite {
    pub fn new(url: &DatabaseUrl, path: PathBuf) -> Self {
        Self {
            url: url.to_string(),
            path,
            conn: Arc::new(OnceLock::new()),
        }
    }

    fn error(&self) -> impl Fn(rusqlite::Error) -> DbError + Send + 'static {
        let url = self.url.clone();
        move |e| DbError::Query {
            url: url.clone(),
            reason: e.to_string(),
        }
    }

    /// Runs `work` on the blocking pool with the connection.
    async fn call<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.get().ok_or(DbError::NotReady { url })?;
            // Statements and transactions are atomic in SQLite, so a lock poisoned by a panic
            // still guards a consistent database.
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn)
        })
        .await
        .map_err(|e| DbError::Query {
            url: self.url.clone(),
            reason: format!("database task: {e}"),
        })?
    }

    /// Opens the file (once), migrates it and runs the seed statements.
    pub async fn prepare(
        &self,
        migrations: &'static [Migration],
        seed: &[Statement],
    ) -> Result<Vec<u64>, DbError> {
        if self.conn.get().is_none() {
            let path = self.path.clone();
            let error = self.error();
            let conn = tokio::task::spawn_blocking(move || open(&path).map_err(error))
                .await
                .map_err(|e| DbError::Query {
                    url: self.url.clone(),
                    reason: format!("database task: {e}"),
                })??;
            // Another prepare may have won the race; its connection is as good as this one.
            let _ = self.conn.set(Mutex::new(conn));
        }
        let url = self.url.clone();
        let error = self.error();
        self.call(move |conn| migrate(conn, migrations, &url, &error))
            .await?;
        self.atomically(seed.to_vec()).await
    }

    pub async fn query(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, DbError> {
        let error = self.error();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&placeholders(sql)).map_err(&error)?;
            let columns = stmt.column_count();
            let mut rows = stmt.query(params_from_iter(params)).map_err(&error)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(&error)? {
                let values = (0..columns)
                    .map(|i| value(row.get_ref(i).map_err(&error)?, i))
                    .collect::<Result<_, _>>()?;
                out.push(Row(values));
            }
            Ok(out)
        })
        .await
    }

    pub async fn atomically(&self, statements: Vec<Statement>) -> Result<Vec<u64>, DbError> {
        let error = self.error();
        self.call(move |conn| {
            // The write lock from the start: a deferred transaction that read and then
            // writes fails at once (SQLITE_BUSY, no busy wait) when another connection wrote
            // in between, as replicas sharing one file do.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&error)?;
            let mut changed = Vec::with_capacity(statements.len());
            for statement in statements {
                let n = tx
                    .prepare_cached(&placeholders(statement.sql))
                    .and_then(|mut s| s.execute(params_from_iter(statement.params)))
                    .map_err(&error)?;
                changed.push(n as u64);
            }
            tx.commit().map_err(&error)?;
            Ok(changed)
        })
        .await
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => rusqlite::types::Null.into(),
            Value::Int(n) => (*n).into(),
            Value::Text(s) => s.as_str().into(),
        })
    }
}

fn value(v: ValueRef<'_>, column: usize) -> Result<Value, DbError> {
    match v {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(n) => Ok(Value::Int(n)),
        ValueRef::Text(bytes) => String::from_utf8(bytes.to_vec())
            .map(Value::Text)
            .map_err(|e| DbError::Column(format!("column {column}: {e}"))),
        other => Err(DbError::Column(format!(
            "column {column} is {:?}, which the shop never stores",
            other.data_type()
        ))),
    }
}

/// PostgreSQL's `$1` is a *named* parameter to SQLite, numbered by first appearance; `?1` is
/// the positional one.
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Switching a new file to WAL takes an exclusive lock and can answer SQLITE_BUSY without
    // waiting while another process opens the same file; try again, bounded.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => break result?,
        }
    }
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// Applies the migrations not applied yet; `PRAGMA user_version` counts the applied ones. The
/// transaction takes the write lock before reading the version, so two processes starting on
/// one file migrate it once.
fn migrate(
    conn: &mut Connection,
    migrations: &[Migration],
    url: &str,
    error: &impl Fn(rusqlite::Error) -> DbError,
) -> Result<(), DbError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error)?;
    let applied: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(error)?;
    let known = migrations.len() as i64;
    if applied > known {
        return Err(DbError::NewerSchema {
            url: url.to_string(),
            found: applied,
            known,
        });
    }
    for (version, migration) in (1..).zip(migrations).skip(applied as usize) {
        tx.execute_batch(migration.sqlite).map_err(error)?;
        tracing::info!(database = url, version, "applied migration");
    }
    tx.pragma_update(None, "user_version", known)
        .map_err(error)?;
    tx.commit().map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_placeholders_become_positional() {
        assert_eq!(
            placeholders("UPDATE t SET a = $2, b = $10 WHERE id = $1 AND c = '$'"),
            "UPDATE t SET a = ?2, b = ?10 WHERE id = ?1 AND c = '$'"
        );
    }
}
