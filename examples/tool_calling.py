"""A tool call round trip with the `openai` client: the model asks for get_weather, we run it,
send the result back, and the model answers with it.

    python examples/tool_calling.py [BASE_URL] [--auto]     (default http://localhost:8000/v1)

By default the call is forced with a named tool_choice: generation is constrained to a
get_weather call whose arguments match the function's JSON schema, so this works with any
model, the small default one included. With --auto the model decides whether to call (start
the server with --enable-auto-tool-choice --tool-call-parser NAME and a model trained for
tools, e.g. Llama 3.1 with --tool-call-parser llama3_json).
"""

import json
import sys

from openai import OpenAI


def get_weather(location: str, unit: str = "celsius") -> str:
    """Stands in for a real weather service."""
    degrees = 22 if unit == "celsius" else 72
    return f"{location}: sunny, {degrees} degrees {unit}"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "A city and its country, e.g. 'Paris, France'"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location", "unit"],
            },
        },
    }
]
FUNCTIONS = {"get_weather": get_weather}

args = [a for a in sys.argv[1:] if not a.startswith("--")]
base_url = args[0] if args else "http://localhost:8000/v1"
tool_choice = "auto" if "--auto" in sys.argv else {"type": "function", "function": {"name": "get_weather"}}
client = OpenAI(base_url=base_url, api_key="EMPTY")  # pass --api-key's value if the server has one
model = client.models.list().data[0].id

messages = [{"role": "user", "content": "What's the weather like in San Francisco?"}]
response = client.chat.completions.create(
    model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=100, temperature=0
)
message = response.choices[0].message
if not message.tool_calls:
    sys.exit(f"The model answered without calling a tool: {message.content!r}")

# Run each call and send its result back, keyed by the call's id.
messages.append(message.model_dump(exclude_none=True))
for call in message.tool_calls:
    arguments = json.loads(call.function.arguments)
    result = FUNCTIONS[call.function.name](**arguments)
    print(f"Function called: {call.function.name}")
    print(f"Arguments: {call.function.arguments}")
    print(f"Result: {result}")
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
print(f"Answer: {answer.choices[0].message.content}")
