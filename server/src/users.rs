//! [`Users`]: who may log in, with what password verifier, and what they may do.
//!
//! Users are kept apart from the catalog's objects, as Postgres keeps roles apart from
//! relations: in `users.json` in the data directory, written atomically and readable by its
//! owner only (0600). A password is never stored: what is kept is its SCRAM-SHA-256 verifier
//! ([`Verifier`]), from which a login can be checked but no password recovered, and which does
//! not let its reader log in (it holds `H(ClientKey)`, not `ClientKey`).
//!
//! The lock here guards a small map and is never held across an await, so a login never
//! waits on DDL, and DDL on another object never waits on a login.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SecureRandom;
use ring::{digest, hmac, pbkdf2};
use serde::{Deserialize, Serialize};
use weir_planner::PlanError;
use weir_planner::catalog::write_private;
use weir_sql::Privilege;

/// The file, under the data directory, holding users.
pub const USERS_FILE: &str = "users.json";

/// The admin user the first start creates.
pub const ADMIN_USER: &str = "weir";

/// PBKDF2 iterations for new verifiers: Postgres' default (`scram_iterations`).
pub const SCRAM_ITERATIONS: u32 = 4096;

type Result<T> = std::result::Result<T, PlanError>;

/// A SCRAM-SHA-256 verifier, as Postgres stores it in `pg_authid.rolpassword`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64).
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Verifier {
    /// The verifier of `password` with a fresh random salt.
    pub fn new(password: &str) -> Result<Self> {
        let mut salt = vec![0u8; 16];
        fill_random(&mut salt)?;
        Self::with_salt(password, &salt, SCRAM_ITERATIONS)
    }

    /// The verifier of `password` for `salt` and `iterations` (RFC 5802, section 3).
    pub fn with_salt(password: &str, salt: &[u8], iterations: u32) -> Result<Self> {
        let iterations = NonZeroU32::new(iterations)
            .ok_or_else(|| PlanError::Internal("SCRAM iterations must not be 0".into()))?;
        // Postgres uses the password as given when SASLprep refuses it; so do we, so that a
        // verifier made here and one made by Postgres agree.
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_string());
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        Ok(Self {
            iterations: iterations.get(),
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        })
    }

    /// Parses Postgres' text form; `None` if `text` is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|i| *i > 0)?;
        Some(Self {
            iterations,
            salt: BASE64.decode(salt).ok().filter(|s| !s.is_empty())?,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

impl fmt::Display for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

/// Never prints the keys.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(SCRAM-SHA-256, ***)")
    }
}

pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| PlanError::Internal("the system's random number generator failed".into()))
}

/// A random password for the first admin: 24 characters of URL-safe base64 (144 bits).
pub fn generate_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    fill_random(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// One user as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredUser {
    /// The verifier's text form; `None`: the user cannot log in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verifier: Option<String>,
    #[serde(default)]
    read: bool,
    #[serde(default)]
    admin: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UsersFile {
    version: u32,
    users: BTreeMap<String, StoredUser>,
}

/// One row of `SHOW USERS` (and, later, `pg_roles`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub read: bool,
    pub admin: bool,
    pub can_login: bool,
}

/// Every user, persisted under the data directory (or in memory, for tests and `weir run`).
#[derive(Debug)]
pub struct Users {
    file: Option<PathBuf>,
    users: RwLock<BTreeMap<String, StoredUser>>,
}

impl Users {
    pub fn in_memory() -> Self {
        Self {
            file: None,
            users: RwLock::default(),
        }
    }

    /// The users saved under `data_dir` (none on a first start).
    pub fn open(data_dir: &Path) -> Result<Self> {
        let file = data_dir.join(USERS_FILE);
        let users = match std::fs::read(&file) {
            Ok(bytes) => {
                serde_json::from_slice::<UsersFile>(&bytes)
                    .map_err(|e| {
                        PlanError::Execution(format!(
                            "users file '{}' is damaged: {e}",
                            file.display()
                        ))
                    })?
                    .users
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(PlanError::Execution(format!(
                    "cannot read '{}': {e}",
                    file.display()
                )));
            }
        };
        Ok(Self {
            file: Some(file),
            users: RwLock::new(users),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// The verifier to check `name`'s login against; `None` if there is no such user or it
    /// has no password.
    pub fn verifier(&self, name: &str) -> Option<Verifier> {
        let users = self.read();
        Verifier::parse(users.get(name)?.verifier.as_deref()?)
    }

    /// Whether `name` exists and holds `privilege` (admin holds every privilege).
    pub fn has(&self, name: &str, privilege: Privilege) -> bool {
        match self.read().get(name) {
            Some(user) => user.admin || (privilege == Privilege::Read && user.read),
            None => false,
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// `CREATE USER`; returns false if it existed and `if_not_exists` was given.
    pub fn create(&self, name: &str, password: Option<&str>, if_not_exists: bool) -> Result<bool> {
        let verifier = password.map(verifier_text).transpose()?;
        let mut users = self.write();
        if users.contains_key(name) {
            return if if_not_exists {
                Ok(false)
            } else {
                Err(PlanError::Plan {
                    sqlstate: "42710",
                    message: format!("role \"{name}\" already exists"),
                })
            };
        }
        users.insert(
            name.to_string(),
            StoredUser {
                verifier,
                read: false,
                admin: false,
            },
        );
        self.persist(&users).inspect_err(|_| {
            users.remove(name);
        })?;
        Ok(true)
    }

    /// `ALTER USER name PASSWORD ...`.
    pub fn set_password(&self, name: &str, password: Option<&str>) -> Result<()> {
        let verifier = password.map(verifier_text).transpose()?;
        let mut users = self.write();
        let user = users.get_mut(name).ok_or_else(|| no_such_role(name))?;
        let before = std::mem::replace(&mut user.verifier, verifier);
        self.persist(&users).inspect_err(|_| {
            if let Some(user) = users.get_mut(name) {
                user.verifier = before;
            }
        })
    }

    /// `DROP USER`: `caller` (if a user) cannot drop itself, and the last admin that can log
    /// in is never dropped (nobody could create another).
    pub fn drop_users(
        &self,
        names: &[String],
        if_exists: bool,
        caller: Option<&str>,
    ) -> Result<()> {
        let mut users = self.write();
        let mut after = users.clone();
        for name in names {
            if Some(name.as_str()) == caller {
                return Err(PlanError::Plan {
                    sqlstate: "55006",
                    message: "current user cannot be dropped".into(),
                });
            }
            if after.remove(name).is_none() && !if_exists {
                return Err(no_such_role(name));
            }
        }
        check_admin_left(&users, &after)?;
        self.persist(&after)?;
        *users = after;
        Ok(())
    }

    /// `GRANT` (`grant` true) or `REVOKE` of `privilege` to every user in `names`.
    pub fn grant(&self, privilege: Privilege, names: &[String], grant: bool) -> Result<()> {
        let mut users = self.write();
        let mut after = users.clone();
        for name in names {
            let user = after.get_mut(name).ok_or_else(|| no_such_role(name))?;
            match privilege {
                Privilege::Read => user.read = grant,
                Privilege::Admin => user.admin = grant,
            }
        }
        check_admin_left(&users, &after)?;
        self.persist(&after)?;
        *users = after;
        Ok(())
    }

    pub fn rows(&self) -> Vec<UserRow> {
        self.read()
            .iter()
            .map(|(name, u)| UserRow {
                name: name.clone(),
                read: u.read || u.admin,
                admin: u.admin,
                can_login: u.verifier.is_some(),
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, StoredUser>> {
        self.users.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, StoredUser>> {
        self.users.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `users` to a temporary file created 0600, then renames it over the old one.
    fn persist(&self, users: &BTreeMap<String, StoredUser>) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&UsersFile {
            version: 1,
            users: users.clone(),
        })
        .map_err(|e| PlanError::Internal(format!("cannot serialize users: {e}")))?;
        write_private(file, &bytes).map_err(|e| {
            PlanError::Execution(format!("cannot write users '{}': {e}", file.display()))
        })
    }
}

/// A password's verifier text; a password that already is a SCRAM verifier (as `pg_dumpall`
/// prints them) is kept as it is, so that `.sql` files need not hold passwords.
fn verifier_text(password: &str) -> Result<String> {
    if password.is_empty() {
        return Err(PlanError::InvalidOption {
            key: String::new(),
            message:
                "a password must not be empty (use PASSWORD NULL for a user that cannot log in)"
                    .into(),
        });
    }
    if password.starts_with("SCRAM-SHA-256$") {
        return Verifier::parse(password)
            .map(|v| v.to_string())
            .ok_or_else(|| PlanError::InvalidOption {
                key: String::new(),
                message: "the password looks like a SCRAM-SHA-256 verifier but is not a valid one"
                    .into(),
            });
    }
    Ok(Verifier::new(password)?.to_string())
}

/// `pg_catalog.pg_roles` (psql's `\du`) from the users: admins show as superusers that may
/// create roles, a user without a password as one that cannot log in.
#[derive(Debug, Clone)]
pub struct CatalogRoles(pub std::sync::Arc<Users>);

#[async_trait::async_trait]
impl datafusion_pg_catalog::pg_catalog::context::PgCatalogContextProvider for CatalogRoles {
    async fn roles(&self) -> Vec<String> {
        self.0.rows().into_iter().map(|row| row.name).collect()
    }

    /// Never `None`: pg_catalog unwraps it, and a user may be dropped between the two calls
    /// (such a user then shows without privileges).
    async fn role(&self, name: &str) -> Option<datafusion_pg_catalog::pg_catalog::context::Role> {
        let row = self.0.rows().into_iter().find(|row| row.name == name);
        let (admin, can_login) = row.map_or((false, false), |r| (r.admin, r.can_login));
        Some(datafusion_pg_catalog::pg_catalog::context::Role {
            name: name.to_string(),
            is_superuser: admin,
            can_login,
            can_create_db: false,
            can_create_role: admin,
            can_create_user: admin,
            can_replication: false,
            grants: Vec::new(),
            inherited_roles: Vec::new(),
        })
    }
}

fn no_such_role(name: &str) -> PlanError {
    PlanError::Plan {
        sqlstate: "42704",
        message: format!("role \"{name}\" does not exist"),
    }
}

/// Refuses a change that would leave no admin able to log in, when there was one.
fn check_admin_left(
    before: &BTreeMap<String, StoredUser>,
    after: &BTreeMap<String, StoredUser>,
) -> Result<()> {
    let admins = |m: &BTreeMap<String, StoredUser>| {
        m.values()
            .filter(|u| u.admin && u.verifier.is_some())
            .count()
    };
    if admins(before) > 0 && admins(after) == 0 {
        return Err(PlanError::Plan {
            sqlstate: "55006",
            message: "this would leave no admin that can log in; grant ADMIN to another user first"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: user "user", password "pencil".
    #[test]
    fn verifier_matches_rfc_7677() {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("ok");
        let v = Verifier::with_salt("pencil", &salt, 4096).expect("ok");
        let text = v.to_string();
        assert!(
            text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"),
            "{text}"
        );
        assert_eq!(Verifier::parse(&text), Some(v.clone()));
        // The server signature of RFC 7677's exchange follows from ServerKey.
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        assert_eq!(
            BASE64.encode(hmac_sha256(&v.server_key, auth_message.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert_eq!(format!("{v:?}"), "Verifier(SCRAM-SHA-256, ***)");
    }

    #[test]
    fn bad_verifier_text_is_refused() {
        for bad in [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$a:b",
            "md5abc",
        ] {
            assert_eq!(Verifier::parse(bad), None, "{bad}");
        }
        let users = Users::in_memory();
        // A valid verifier given as the password is stored as it is.
        let given = Verifier::with_salt("pw", b"0123456789abcdef", 4096).expect("ok");
        users
            .create("b", Some(&given.to_string()), false)
            .expect("ok");
        assert_eq!(users.verifier("b"), Some(given));
        assert!(
            users
                .create("a", Some("SCRAM-SHA-256$4096:x$y:z"), false)
                .is_err()
        );
        assert!(users.create("a", Some(""), false).is_err());
    }

    #[test]
    fn privileges_persist_and_last_admin_stays() {
        let dir = tempfile::tempdir().expect("ok");
        let users = Users::open(dir.path()).expect("ok");
        assert!(users.is_empty());
        users.create(ADMIN_USER, Some("secret"), false).expect("ok");
        users
            .grant(Privilege::Admin, &[ADMIN_USER.into()], true)
            .expect("ok");
        users.create("alice", Some("pw"), false).expect("ok");
        assert!(!users.create("alice", None, true).expect("ok"));
        assert_eq!(
            users
                .create("alice", None, false)
                .expect_err("an error")
                .sqlstate(),
            "42710"
        );
        assert!(!users.has("alice", Privilege::Read));
        users
            .grant(Privilege::Read, &["alice".into()], true)
            .expect("ok");
        assert!(users.has("alice", Privilege::Read));
        assert!(!users.has("alice", Privilege::Admin));
        assert!(users.has(ADMIN_USER, Privilege::Read));
        // The last admin can be neither revoked nor dropped, nor drop itself.
        let e = users
            .grant(Privilege::Admin, &[ADMIN_USER.into()], false)
            .expect_err("an error");
        assert_eq!(e.sqlstate(), "55006");
        assert!(
            users
                .drop_users(&[ADMIN_USER.into()], false, Some("alice"))
                .is_err()
        );
        assert!(
            users
                .drop_users(&[ADMIN_USER.into()], false, Some(ADMIN_USER))
                .is_err()
        );
        assert_eq!(
            users
                .drop_users(&["nobody".into()], false, None)
                .expect_err("an error")
                .sqlstate(),
            "42704"
        );
        users
            .drop_users(&["nobody".into()], true, None)
            .expect("ok");

        let file = dir.path().join(USERS_FILE);
        let text = std::fs::read_to_string(&file).expect("ok");
        assert!(
            !text.contains("secret") && !text.contains("\"pw\""),
            "{text}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("ok").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = Users::open(dir.path()).expect("ok");
        assert!(again.has("alice", Privilege::Read));
        let expected = Verifier::with_salt(
            "pw",
            &again.verifier("alice").expect("ok").salt,
            SCRAM_ITERATIONS,
        )
        .expect("ok");
        assert_eq!(again.verifier("alice"), Some(expected));
        again.set_password("alice", None).expect("ok");
        assert_eq!(again.verifier("alice"), None);
        assert_eq!(again.rows().len(), 2);
    }
}
