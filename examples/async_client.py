"""The asyncio client: several completions at once over one channel (the server batches them together).

python examples/async_client.py   # WEIR_TARGET=host:port for another server
"""

import asyncio
import os

from weir_client import AsyncWeirClient

TARGET = os.environ.get("WEIR_TARGET", "localhost:50051")
QUESTIONS = ["What is a weir?", "What is gRPC?", "What is a token?", "What is a GPU?"]


async def ask(client: AsyncWeirClient, question: str) -> str:
    completion = await client.complete(messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0)
    return completion.text.strip()


async def main() -> None:
    async with AsyncWeirClient(TARGET, timeout=120, api_key=os.environ.get("WEIR_API_KEY")) as client:
        await client.wait_until_ready(timeout=60)
        answers = await asyncio.gather(*(ask(client, q) for q in QUESTIONS))
        for question, answer in zip(QUESTIONS, answers, strict=True):
            print(f"Q: {question}\nA: {answer}\n")

        # Streaming works the same way with `async for`.
        async for chunk in client.generate("The capital of France is", max_tokens=8, temperature=0):
            print(chunk.text, end="", flush=True)
        print()


if __name__ == "__main__":
    asyncio.run(main())
