//! Compatibility of `corral sim` with real client libraries: ollama-rs and
//! async-openai, each asserting the exact text that came back.

use corral::sim::{self, ServerSpec, SimServer};
use futures_util::StreamExt;
use tokio::net::TcpListener;

async fn start() -> SimServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(l, ServerSpec::default()).await.unwrap()
}

fn ollama(s: &SimServer) -> ollama_rs::Ollama {
    ollama_rs::Ollama::try_new(format!("http://127.0.0.1:{}", s.port())).unwrap()
}

fn openai(s: &SimServer) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let cfg = async_openai::config::OpenAIConfig::new()
        .with_api_base(format!("http://127.0.0.1:{}/v1", s.port()))
        .with_api_key("anything");
    async_openai::Client::with_config(cfg)
}

#[tokio::test]
async fn ollama_rs_generates_chats_embeds_and_lists_models() {
    use ollama_rs::generation::chat::ChatMessage;
    use ollama_rs::generation::chat::request::ChatMessageRequest;
    use ollama_rs::generation::completion::request::GenerationRequest;
    use ollama_rs::generation::embeddings::request::GenerateEmbeddingsRequest;
    let s = start().await;
    let o = ollama(&s);
    let r = o
        .generate(GenerationRequest::new(
            "llama3.2".into(),
            "why is the sky blue",
        ))
        .await
        .unwrap();
    assert_eq!(
        r.response,
        sim::expected_text(0, "llama3.2", "why is the sky blue", 16)
    );
    let c = o
        .send_chat_messages(ChatMessageRequest::new(
            "llama3.2".into(),
            vec![ChatMessage::user("hello".into())],
        ))
        .await
        .unwrap();
    assert_eq!(
        c.message.content,
        sim::expected_text(0, "llama3.2", "hello", 16)
    );
    let e = o
        .generate_embeddings(GenerateEmbeddingsRequest::new(
            "all-minilm".into(),
            "x".into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        e.embeddings,
        vec![sim::expected_embedding(0, "all-minilm", "x", 16)]
    );
    let models = o.list_local_models().await.unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["llama3.2:latest", "all-minilm:latest"]);
}

#[tokio::test]
async fn ollama_rs_streams_generate_token_by_token() {
    use ollama_rs::generation::completion::request::GenerationRequest;
    let s = start().await;
    let mut stream = ollama(&s)
        .generate_stream(GenerationRequest::new("llama3.2".into(), "stream me"))
        .await
        .unwrap();
    let mut text = String::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        for r in chunk.unwrap() {
            text.push_str(&r.response);
            done |= r.done;
        }
    }
    assert!(done);
    assert_eq!(text, sim::expected_text(0, "llama3.2", "stream me", 16));
}

#[tokio::test]
async fn async_openai_chat_completions_stream_and_not() {
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    let s = start().await;
    let client = openai(&s);
    let req = CreateChatCompletionRequestArgs::default()
        .model("llama3.2")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi there")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let want = sim::expected_text(0, "llama3.2", "hi there", 16);
    let r = client.chat().create(req.clone()).await.unwrap();
    assert_eq!(r.choices[0].message.content.as_deref(), Some(want.as_str()));
    let mut stream = client.chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(text, want);
}

#[tokio::test]
async fn async_openai_embeddings_and_models_list() {
    use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
    let s = start().await;
    let client = openai(&s);
    let req = CreateEmbeddingRequestArgs::default()
        .model("all-minilm")
        .input("x")
        .build()
        .unwrap();
    let r = client.embeddings().create(req).await.unwrap();
    assert_eq!(
        r.data[0].embedding,
        sim::expected_embedding(0, "all-minilm", "x", 16)
    );
    let models = client.models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["llama3.2:latest", "all-minilm:latest"]);
}
