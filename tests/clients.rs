//! Third-party clients, `ollama-rs` and `async-openai`, with streaming: each
//! check runs once straight against a simulated server (the simulator must
//! fool them) and once through corral over three simulated backends (corral
//! must too), asserting the exact content that came back.

mod common;

use common::{TestFleet, TestProxy, start_proxy};
use corral::sim::{ServerSpec, SimServer, expected_embedding, expected_text};
use futures_util::StreamExt;
use ollama_rs::generation::chat::ChatMessage;
use ollama_rs::generation::chat::request::ChatMessageRequest;
use ollama_rs::generation::completion::request::GenerationRequest;
use ollama_rs::generation::embeddings::request::GenerateEmbeddingsRequest;

/// Where the clients point: a lone simulated server, or corral.
enum Target {
    Sim(SimServer),
    /// The fleet is held for as long as corral serves it.
    Corral {
        proxy: TestProxy,
        _fleet: TestFleet,
    },
}

impl Target {
    async fn sim() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::Sim(
            SimServer::start(listener, ServerSpec::default())
                .await
                .unwrap(),
        )
    }

    async fn corral() -> Self {
        let fleet = TestFleet::uniform(3, ServerSpec::default()).await;
        let proxy = start_proxy(&fleet, |_| {}).await;
        Self::Corral {
            proxy,
            _fleet: fleet,
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Sim(s) => format!("http://127.0.0.1:{}", s.port()),
            Self::Corral { proxy, .. } => proxy.url.clone(),
        }
    }

    fn ollama(&self) -> ollama_rs::Ollama {
        ollama_rs::Ollama::try_new(self.url()).unwrap()
    }

    fn openai(&self) -> async_openai::Client<async_openai::config::OpenAIConfig> {
        let cfg = async_openai::config::OpenAIConfig::new()
            .with_api_base(format!("{}/v1", self.url()))
            .with_api_key("unused");
        async_openai::Client::with_config(cfg)
    }
}

async fn ollama_rs_generates_chats_embeds_and_lists(t: Target) {
    let o = t.ollama();
    let r = o
        .generate(GenerationRequest::new(
            "llama3.2".into(),
            "why is the sky blue",
        ))
        .await
        .unwrap();
    assert_eq!(
        r.response,
        expected_text(0, "llama3.2", "why is the sky blue", 16)
    );
    let c = o
        .send_chat_messages(ChatMessageRequest::new(
            "llama3.2".into(),
            vec![ChatMessage::user("hello".into())],
        ))
        .await
        .unwrap();
    assert_eq!(c.message.content, expected_text(0, "llama3.2", "hello", 16));
    let e = o
        .generate_embeddings(GenerateEmbeddingsRequest::new(
            "all-minilm".into(),
            "x".into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        e.embeddings,
        vec![expected_embedding(0, "all-minilm", "x", 16)]
    );
    let mut names: Vec<String> = o
        .list_local_models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    assert_eq!(names, ["all-minilm:latest", "llama3.2:latest"]);
}

async fn ollama_rs_streams_generate_and_chat(t: Target) {
    let o = t.ollama();
    let mut stream = o
        .generate_stream(GenerationRequest::new("llama3.2".into(), "stream me"))
        .await
        .unwrap();
    let (mut text, mut done) = (String::new(), false);
    while let Some(chunk) = stream.next().await {
        for r in chunk.unwrap() {
            text.push_str(&r.response);
            done |= r.done;
        }
    }
    assert!(done);
    assert_eq!(text, expected_text(0, "llama3.2", "stream me", 16));
    let request =
        ChatMessageRequest::new("llama3.2".into(), vec![ChatMessage::user("chat me".into())]);
    let mut stream = o.send_chat_messages_stream(request).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&chunk.unwrap().message.content);
    }
    assert_eq!(text, expected_text(0, "llama3.2", "chat me", 16));
}

async fn async_openai_chat_streams_and_not(t: Target) {
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    let client = t.openai();
    let message = ChatCompletionRequestUserMessageArgs::default()
        .content("hi there")
        .build()
        .unwrap();
    let req = CreateChatCompletionRequestArgs::default()
        .model("llama3.2")
        .messages([message.into()])
        .build()
        .unwrap();
    let want = expected_text(0, "llama3.2", "hi there", 16);
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

async fn async_openai_embeds_and_lists_models(t: Target) {
    use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
    let client = t.openai();
    let req = CreateEmbeddingRequestArgs::default()
        .model("all-minilm")
        .input("x")
        .build()
        .unwrap();
    let r = client.embeddings().create(req).await.unwrap();
    assert_eq!(
        r.data[0].embedding,
        expected_embedding(0, "all-minilm", "x", 16)
    );
    let mut ids: Vec<String> = client
        .models()
        .list()
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["all-minilm:latest", "llama3.2:latest"]);
}

#[tokio::test]
async fn ollama_rs_generates_chats_embeds_and_lists_on_the_sim() {
    ollama_rs_generates_chats_embeds_and_lists(Target::sim().await).await;
}

#[tokio::test]
async fn ollama_rs_generates_chats_embeds_and_lists_through_corral() {
    ollama_rs_generates_chats_embeds_and_lists(Target::corral().await).await;
}

#[tokio::test]
async fn ollama_rs_streams_generate_and_chat_on_the_sim() {
    ollama_rs_streams_generate_and_chat(Target::sim().await).await;
}

#[tokio::test]
async fn ollama_rs_streams_generate_and_chat_through_corral() {
    ollama_rs_streams_generate_and_chat(Target::corral().await).await;
}

#[tokio::test]
async fn async_openai_chat_streams_and_not_on_the_sim() {
    async_openai_chat_streams_and_not(Target::sim().await).await;
}

#[tokio::test]
async fn async_openai_chat_streams_and_not_through_corral() {
    async_openai_chat_streams_and_not(Target::corral().await).await;
}

#[tokio::test]
async fn async_openai_embeds_and_lists_models_on_the_sim() {
    async_openai_embeds_and_lists_models(Target::sim().await).await;
}

#[tokio::test]
async fn async_openai_embeds_and_lists_models_through_corral() {
    async_openai_embeds_and_lists_models(Target::corral().await).await;
}
