//! Who may connect: the startup phase of every connection.
//!
//! - `--auth scram` (the default): SCRAM-SHA-256 against the verifiers in [`Users`]
//!   ([`super::scram`]). A wrong password and an unknown user fail alike, with 28P01.
//! - `--auth trust`: any user name is accepted, with every privilege (local demos).
//!
//! With TLS required, a connection that did not negotiate TLS is refused (28000) before any
//! authentication. Failed logins are counted per client address: after
//! [`MAX_FAILURES`] within [`FAILURE_WINDOW`], that address is refused (28000) until the
//! window ends, so a password cannot be guessed at line rate.

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::{
    ClientInfo, METADATA_USER, PgWireConnectionState, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use weir_runtime::Metrics;
use weir_sql::Privilege;

use super::scram::{self, Exchange, ScramError};
use crate::users::{Users, fill_random};

/// Failed logins from one address within [`FAILURE_WINDOW`] before it is refused.
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// SCRAM-SHA-256 with the users `CREATE USER` makes.
    Scram,
    /// No password; every client is an admin. For local demos only.
    Trust,
}

/// What every connection's startup shares.
#[derive(Debug)]
pub struct Auth {
    pub mode: AuthMode,
    pub tls_required: bool,
    users: Arc<Users>,
    limiter: LoginLimiter,
    /// Keys the mock salts of unknown users.
    mock_secret: [u8; 32],
    metrics: Metrics,
}

impl Auth {
    pub fn new(mode: AuthMode, tls_required: bool, users: Arc<Users>, metrics: Metrics) -> Self {
        let mut mock_secret = [0u8; 32];
        // Without randomness the mock salts are merely predictable; logins still work.
        let _ = fill_random(&mut mock_secret);
        Self {
            mode,
            tls_required,
            users,
            limiter: LoginLimiter::default(),
            mock_secret,
            metrics,
        }
    }

    /// A password login over HTTP (the web console): the same users, failed-login limit and
    /// counters as SCRAM on the SQL port. An unknown user costs the same work as a known
    /// one and fails alike.
    pub fn check_password(&self, ip: IpAddr, user: &str, password: &str) -> PasswordCheck {
        if let Err(wait) = self.limiter.check(ip) {
            self.metrics.logins("rate_limited").inc();
            return PasswordCheck::RateLimited(wait);
        }
        let known = self.users.verifier(user);
        let (salt, iterations) = match &known {
            Some(v) => (v.salt.clone(), v.iterations),
            None => (
                crate::users::hmac_sha256(&self.mock_secret, user.as_bytes())[..16].to_vec(),
                crate::users::SCRAM_ITERATIONS,
            ),
        };
        let matches = match crate::users::Verifier::with_salt(password, &salt, iterations) {
            Ok(computed) => known.is_some_and(|known| {
                constant_time_eq(&computed.stored_key, &known.stored_key)
                    & constant_time_eq(&computed.server_key, &known.server_key)
            }),
            Err(_) => false,
        };
        if matches {
            self.metrics.logins("ok").inc();
            self.limiter.succeeded(ip);
            PasswordCheck::Ok
        } else {
            self.metrics.logins("wrong_password").inc();
            self.limiter.failed(ip);
            tracing::info!(%user, peer = %ip, "console password authentication failed");
            PasswordCheck::Wrong
        }
    }

    /// Whether `user` may run DDL (under `--auth trust`, everyone may).
    pub fn is_admin(&self, user: Option<&str>) -> bool {
        user.is_none_or(|user| self.users.has(user, Privilege::Admin))
    }

    /// A startup handler for one connection.
    pub fn startup(self: &Arc<Self>) -> Login {
        Login {
            auth: self.clone(),
            exchange: Mutex::new(None),
        }
    }
}

/// What [`Auth::check_password`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Ok,
    /// A wrong password or an unknown user.
    Wrong,
    /// Too many failures from this address: refused for this long without checking.
    RateLimited(Duration),
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One connection's startup: its SCRAM exchange, once the server's first message is sent.
pub struct Login {
    auth: Arc<Auth>,
    exchange: Mutex<Option<Exchange>>,
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let auth = &self.auth;
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if auth.tls_required && !client.is_secure() {
                    auth.metrics.logins("tls_required").inc();
                    return Err(fatal(
                        "28000",
                        "this server requires TLS: connect with sslmode=require (or verify-full)",
                    ));
                }
                if let Err(wait) = auth.limiter.check(client.socket_addr().ip()) {
                    auth.metrics.logins("rate_limited").inc();
                    return Err(fatal(
                        "28000",
                        &format!(
                            "too many failed logins from {}; try again in {} s",
                            client.socket_addr().ip(),
                            wait.as_secs().max(1)
                        ),
                    ));
                }
                match auth.mode {
                    AuthMode::Trust => self.finish(client, true).await?,
                    AuthMode::Scram => {
                        client.set_state(PgWireConnectionState::AuthenticationInProgress);
                        client
                            .send(PgWireBackendMessage::Authentication(Authentication::SASL(
                                vec!["SCRAM-SHA-256".to_string()],
                            )))
                            .await?;
                    }
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let pending = self
                    .exchange
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let result = match pending {
                    None => {
                        let initial = message.into_sasl_initial_response()?;
                        if initial.auth_method != "SCRAM-SHA-256" {
                            auth.metrics.logins("protocol_error").inc();
                            return Err(fatal(
                                "28000",
                                &format!(
                                    "SASL mechanism {} is not supported; this server offers SCRAM-SHA-256",
                                    initial.auth_method
                                ),
                            ));
                        }
                        let data = initial.data.unwrap_or_default();
                        scram::client_first(
                            &data,
                            auth.users.verifier(&user),
                            &user,
                            &auth.mock_secret,
                        )
                        .map(|(server_first, exchange)| {
                            *self.exchange.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(exchange);
                            Authentication::SASLContinue(server_first.into_bytes().into())
                        })
                    }
                    Some(exchange) => {
                        let response = message.into_sasl_response()?;
                        exchange.client_final(&response.data).map(|server_final| {
                            Authentication::SASLFinal(server_final.into_bytes().into())
                        })
                    }
                };
                match result {
                    Ok(reply) => {
                        let done = matches!(reply, Authentication::SASLFinal(_));
                        client
                            .send(PgWireBackendMessage::Authentication(reply))
                            .await?;
                        if done {
                            auth.metrics.logins("ok").inc();
                            auth.limiter.succeeded(client.socket_addr().ip());
                            let admin = auth.users.has(&user, Privilege::Admin);
                            self.finish(client, admin).await?;
                        }
                    }
                    Err(ScramError::WrongPassword) => {
                        auth.metrics.logins("wrong_password").inc();
                        auth.limiter.failed(client.socket_addr().ip());
                        tracing::info!(%user, peer = %client.socket_addr(), "password authentication failed");
                        return Err(fatal(
                            "28P01",
                            &format!("password authentication failed for user \"{user}\""),
                        ));
                    }
                    Err(ScramError::Malformed(what)) => {
                        auth.metrics.logins("protocol_error").inc();
                        auth.limiter.failed(client.socket_addr().ip());
                        return Err(fatal("08P01", &format!("malformed SCRAM message: {what}")));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Login {
    /// AuthenticationOk, the server's parameters, the cancel key, ReadyForQuery.
    async fn finish<C>(&self, client: &mut C, superuser: bool) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, secret) = RandomPidSecretKeyGenerator::default().generate(&*client);
        client.set_pid_and_secret_key(pid, secret);
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.is_superuser = superuser;
        parameters.server_version = crate::introspection::SERVER_VERSION.to_string();
        finish_authentication(client, &parameters).await
    }
}

fn fatal(sqlstate: &str, message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".to_string(),
        sqlstate.to_string(),
        message.to_string(),
    )))
}

/// Failed logins per client address, in fixed windows.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl LoginLimiter {
    /// `Err(time left)` while `ip` has used up its failures for the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(&ip) {
            Some((since, n)) if *n >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                Err(FAILURE_WINDOW.saturating_sub(since.elapsed()))
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() > 100_000 {
            failures.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_too_many_failures() {
        let limiter = LoginLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().expect("ok");
        let b: IpAddr = "10.0.0.2".parse().expect("ok");
        for _ in 0..MAX_FAILURES {
            assert!(limiter.check(a).is_ok());
            limiter.failed(a);
        }
        let wait = limiter.check(a).expect_err("an error");
        assert!(
            wait <= FAILURE_WINDOW && wait > Duration::from_secs(50),
            "{wait:?}"
        );
        assert!(limiter.check(b).is_ok(), "other addresses are not affected");
        limiter.succeeded(a);
        assert!(limiter.check(a).is_ok());
    }
}
