// Weir from Node.js: load the contract (client/weir/v1/inference.proto) with @grpc/proto-loader at run time,
// list the models and stream a chat completion.
//   cd examples/node && npm ci && node generate.js "Say hi."   (WEIR_TARGET=host:port for another server)
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "client", "weir", "v1", "inference.proto");
const TARGET = process.env.WEIR_TARGET || "localhost:50051";

// keepCase: field names as in the .proto (snake_case); enums as their names; defaults filled in.
const definition = protoLoader.loadSync(PROTO, { keepCase: true, enums: String, longs: Number, defaults: true });
const weir = grpc.loadPackageDefinition(definition).weir.v1;

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.WEIR_API_KEY) md.set("authorization", `Bearer ${process.env.WEIR_API_KEY}`);
  return md;
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

function listModels(client) {
  return new Promise((resolve, reject) =>
    client.ListModels({}, metadata(), deadline(30), (err, reply) => (err ? reject(err) : resolve(reply.models))),
  );
}

function generate(client, prompt) {
  return new Promise((resolve, reject) => {
    const request = {
      messages: { messages: [{ role: "user", content: prompt }] },
      sampling_params: { max_tokens: 32, temperature: 0 },
    };
    const call = client.Generate(request, metadata(), deadline(120));
    call.on("data", (message) => {
      process.stdout.write(message.text);
      if (message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
        process.stdout.write(`\n[${message.finish_reason}, ${message.usage.total_tokens} tokens]\n`);
      }
    });
    call.on("error", reject);
    call.on("end", resolve);
  });
}

async function main() {
  const client = new weir.InferenceService(TARGET, grpc.credentials.createInsecure());
  for (const model of await listModels(client)) {
    const task = model.task.replace("MODEL_TASK_", "").toLowerCase();
    console.log(`${task} ${model.id}${model.is_default ? " (default)" : ""}`);
  }
  await generate(client, process.argv.slice(2).join(" ") || "Say hi.");
  client.close();
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] : ""} ${err.details || err.message}`);
  process.exit(1);
});
