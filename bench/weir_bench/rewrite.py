"""An input-grounded workload: rewrite a given passage (prose or code), so the output overlaps the prompt the way
edits, summaries with quotes and code changes do; what n-gram speculative decoding (prompt lookup) is for."""

from __future__ import annotations

from weir_bench.dataset import Conversation

PASSAGES = (
    "The river rose slowly through the night. By morning the low fields were under water, and the farmers moved "
    "their animals to the hill behind the church. Nobody was hurt, but the old stone bridge was gone, and the "
    "village was cut off from the market town for most of a week. The council met in the school hall and agreed "
    "to build a new bridge higher up the valley, where the banks are steep and the water runs narrow.",
    "def merge_intervals(intervals):\n"
    "    intervals = sorted(intervals, key=lambda pair: pair[0])\n"
    "    merged = []\n"
    "    for start, end in intervals:\n"
    "        if merged and start <= merged[-1][1]:\n"
    "            merged[-1][1] = max(merged[-1][1], end)\n"
    "        else:\n"
    "            merged.append([start, end])\n"
    "    return merged\n",
    "Our return policy is simple. You can return any item within thirty days of delivery for a full refund, as "
    "long as it is unused and in its original packaging. To start a return, sign in to your account, open the "
    "order, and choose the items you want to send back. We will email you a prepaid label within one business "
    "day. Refunds are issued to the original payment method once the item reaches our warehouse.",
    "class LRUCache:\n"
    "    def __init__(self, capacity):\n"
    "        self.capacity = capacity\n"
    "        self.items = OrderedDict()\n"
    "\n"
    "    def get(self, key):\n"
    "        if key not in self.items:\n"
    "            return None\n"
    "        self.items.move_to_end(key)\n"
    "        return self.items[key]\n"
    "\n"
    "    def put(self, key, value):\n"
    "        self.items[key] = value\n"
    "        self.items.move_to_end(key)\n"
    "        if len(self.items) > self.capacity:\n"
    "            self.items.popitem(last=False)\n",
)


def rewrite_conversations() -> list[Conversation]:
    """One request per passage: rewrite it with one small change; the answer (the passage) sets the output length."""
    conversations = []
    for passage in PASSAGES:
        kind = "code" if passage.startswith(("def ", "class ")) else "passage"
        prompt = (
            f"Here is a {kind}:\n\n{passage}\n\nRewrite the {kind} above, keeping every line the same except that "
            f"you fix any typo. The rewritten {kind}:\n\n"
        )
        conversations.append(Conversation(prompt, passage))
    return conversations
