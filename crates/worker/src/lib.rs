//! placeholder
/// Server settings.
pub struct ServerConfig {
    pub model_id: String,
    pub max_body_bytes: usize,
}
/// Serve.
pub async fn serve(
    _l: tokio::net::TcpListener,
    _e: lastmile_engine::EngineHandle,
    _c: ServerConfig,
    _s: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    Ok(())
}
