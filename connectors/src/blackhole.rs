//! The `blackhole` sink: counts rows (in the sink metrics) and discards them.

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use weir_runtime::connector::{ConnectorError, SinkFactory};
use weir_runtime::{Result, Sink};
use weir_sql::Options;

#[derive(Debug)]
pub struct BlackholeFactory;

impl BlackholeFactory {
    pub fn try_new(options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        reader.finish()?;
        Ok(Self)
    }
}

impl SinkFactory for BlackholeFactory {
    fn connector(&self) -> &'static str {
        "blackhole"
    }

    fn create(&self, _metrics: &weir_runtime::Metrics) -> Result<Box<dyn Sink>> {
        Ok(Box::new(BlackholeSink))
    }
}

/// Discards every batch; the pipeline's sink metrics count the rows.
#[derive(Debug)]
pub struct BlackholeSink;

#[async_trait]
impl Sink for BlackholeSink {
    async fn write(&mut self, _batch: RecordBatch) -> Result<()> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
