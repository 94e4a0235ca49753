//! The Postgres wire protocol front door (pgwire): simple and extended query protocols.
//!
//! Results are Arrow batches encoded by `arrow-pg` (text or binary, per the client's request).
//! Every error reaches the client as an ErrorResponse with its SQLSTATE and, for syntax
//! errors, the position; a failing statement never affects another connection.

pub mod auth;
mod errors;
mod scram;
pub mod tls;

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow_pg::datatypes::df::deserialize_parameters;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch};
use async_trait::async_trait;
use futures::{Sink, StreamExt, stream};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, METADATA_USER, PgWireServerHandlers, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use tokio::net::TcpListener;

use self::auth::{Auth, AuthMode};
use crate::engine::{Caller, Engine, Output, Tail};
pub use errors::to_pg_error;

/// Accepts connections forever; each runs on its own task. `tls`: offered to every client
/// (and required if `auth` says so).
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
) {
    let backend = Arc::new(Backend::new(engine, auth.mode));
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let handlers = Handlers {
                    backend: backend.clone(),
                    auth: auth.clone(),
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection's handlers: the shared backend, and a startup handler of its own (it holds
/// the connection's SCRAM exchange).
struct Handlers {
    backend: Arc<Backend>,
    auth: Arc<Auth>,
}

impl PgWireServerHandlers for Handlers {
    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        Arc::new(self.auth.startup())
    }

    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.backend.clone()
    }
}

/// Executes statements for every connection through the shared engine.
pub struct Backend {
    engine: Arc<Engine>,
    parser: Arc<Parser>,
    mode: AuthMode,
}

impl Backend {
    pub fn new(engine: Arc<Engine>, mode: AuthMode) -> Self {
        Self {
            parser: Arc::new(Parser {
                engine: engine.clone(),
                mode,
            }),
            engine,
            mode,
        }
    }
}

/// Who a connection's statements run as: its user, or anyone under `--auth trust`.
fn caller<C: ClientInfo>(mode: AuthMode, client: &C) -> Caller<'_> {
    match mode {
        AuthMode::Trust => Caller::Trusted,
        AuthMode::Scram => Caller::User(
            client
                .metadata()
                .get(METADATA_USER)
                .map(String::as_str)
                .unwrap_or_default(),
        ),
    }
}

/// A statement prepared by the extended protocol: its text, its result columns and
/// parameter types (planned once, at Parse).
#[derive(Debug, Clone)]
pub struct Prepared {
    sql: String,
    schema: Option<SchemaRef>,
    parameter_types: Vec<Option<arrow::datatypes::DataType>>,
}

/// Plans statements at Parse time so Describe can answer without running them.
pub struct Parser {
    engine: Arc<Engine>,
    mode: AuthMode,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let schema = self
            .engine
            .describe_as(caller(self.mode, client), sql)
            .await
            .map_err(|e| to_pg_error(&e, sql))?;
        let parameter_types = self
            .engine
            .parameter_types(sql)
            .await
            .map_err(|e| to_pg_error(&e, sql))?;
        Ok(Some(Prepared {
            sql: sql.to_string(),
            schema,
            parameter_types,
        }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        stmt.parameter_types
            .iter()
            .map(|t| match t {
                Some(t) => arrow_pg::datatypes::into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.schema {
            Some(schema) => {
                arrow_schema_to_pg_fields(schema, format.unwrap_or(&Format::UnifiedText), None)
            }
            None => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut responses = Vec::new();
        for result in self
            .engine
            .execute_as(caller(self.mode, client), query)
            .await
        {
            match result {
                Ok(output) => responses.push(to_response(output, &Format::UnifiedText)?),
                Err(e) => {
                    responses.push(Response::Error(Box::new(errors::error_info(&e, query))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let types: Vec<Option<&arrow::datatypes::DataType>> = prepared
            .parameter_types
            .iter()
            .map(|t| t.as_ref())
            .collect();
        let params = deserialize_parameters(portal, &types)?;
        let output = self
            .engine
            .execute_with_params(caller(self.mode, client), &prepared.sql, params)
            .await
            .map_err(|e| to_pg_error(&e, &prepared.sql))?;
        to_response(output, &portal.result_column_format)
    }
}

fn to_response(output: Output, format: &Format) -> PgWireResult<Response> {
    match output {
        Output::Command(tag) => Ok(match tag.as_str() {
            "BEGIN" => Response::TransactionStart(Tag::new(&tag)),
            "COMMIT" | "ROLLBACK" => Response::TransactionEnd(Tag::new(&tag)),
            "EMPTY" => Response::EmptyQuery,
            _ => Response::Execution(Tag::new(&tag)),
        }),
        Output::Rows { schema, batches } => {
            let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, None)?);
            let rows: Vec<PgWireResult<DataRow>> = batches
                .into_iter()
                .flat_map(|batch| encode_batch(&fields, batch))
                .collect();
            Ok(Response::Query(QueryResponse::new(
                fields,
                stream::iter(rows),
            )))
        }
        Output::Tail(tail) => {
            let fields = Arc::new(arrow_schema_to_pg_fields(&tail.schema, format, None)?);
            Ok(Response::Query(QueryResponse::new(
                fields.clone(),
                tail_rows(tail, fields),
            )))
        }
    }
}

/// Rows of a live tail as they arrive; the tail stops when the stream is dropped.
fn tail_rows(
    tail: Tail,
    fields: Arc<Vec<FieldInfo>>,
) -> impl futures::Stream<Item = PgWireResult<DataRow>> + Send {
    stream::unfold((tail, 0usize), |(mut tail, mut returned)| async move {
        let batch = tail.next_batch(&mut returned).await?;
        Some((batch, (tail, returned)))
    })
    .flat_map(move |batch| stream::iter(encode_batch(&fields, batch)))
}

/// Encodes one batch's rows; a batch whose width does not match the announced columns is an
/// error for this statement (a bug), never a panic that drops the connection.
fn encode_batch(
    fields: &Arc<Vec<FieldInfo>>,
    batch: arrow::record_batch::RecordBatch,
) -> Vec<PgWireResult<DataRow>> {
    if batch.num_columns() != fields.len() {
        let e = weir_planner::PlanError::Internal(format!(
            "result has {} columns but {} were announced",
            batch.num_columns(),
            fields.len()
        ));
        return vec![Err(to_pg_error(&e, ""))];
    }
    encode_recordbatch(fields.clone(), batch).collect()
}
