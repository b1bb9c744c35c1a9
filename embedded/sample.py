"""Deterministic generator for the bundled sample preference dataset.

The data
--------
``wspo`` ships a small, synthetic preference dataset so that the tokenization,
training and alignment code can be exercised (and tested) without network
access.  It is written by :func:`write_sample` into ``SAMPLE_DIR``
(``data/ultrafeedback_sample/`` next to this file) as two JSON-Lines files,
``train_prefs.jsonl`` and ``test_prefs.jsonl``, mirroring the splits of
``HuggingFaceH4/ultrafeedback_binarized``.  Every row is produced from
templates with ``random.Random(seed)`` only (no clock, no ``hash()``), so
running this module twice gives byte-identical files.  The test split holds
out whole prompts: no test prompt appears in the train split.  A third file,
``sft.jsonl``, is the neutral SFT split (see :func:`neutral_sft_rows`): the train
prompts, each answered by its chosen or its rejected response at random, in the
``{"prompt", "prompt_id", "messages"}`` layout of ``HuggingFaceH4/ultrachat_200k``
(read it with ``--dataset_format columns --column_map prompt=prompt,chosen=messages,id=prompt_id``).

Layout
------
One JSON object per line, UTF-8, ``ensure_ascii=False``, ``"\\n"`` line
endings, with exactly the keys of the H4 layout::

    {"prompt": str,                 # the (first) user message
     "prompt_id": str,              # sha256 hex digest of the UTF-8 prompt
     "chosen":   [{"role": ..., "content": ...}, ...],
     "rejected": [{"role": ..., "content": ...}, ...],
     "messages": [...],             # identical to "chosen"
     "score_chosen": float,         # 7.0 .. 10.0 in steps of 0.5
     "score_rejected": float}       # 1.0 .. 6.0 in steps of 0.5

``chosen`` and ``rejected`` share every message except the last one, which is
the assistant's final response.  About 70% of the rows are a single user turn
followed by the assistant; about 15% start with a ``system`` message; about
15% are multi-turn (user, assistant, user, assistant-final), in which case
``prompt`` is the first user message, as in H4.  ``score_chosen`` is always
strictly greater than ``score_rejected``.

Content covers cooking, programming, travel, science, maths, writing, history
and health.  Responses are 2-6 sentences (roughly 25-120 words, mostly under
600 characters).  A good share of rows contain non-ASCII text (CJK, emoji with
skin-tone modifiers and ZWJ sequences, accented Latin, combining accents such
as ``"e\\u0301"``), fenced ```python code blocks with indentation and blank
lines, and runs of spaces, tabs and newlines.  The train split also contains
three deliberately unusual but valid rows: a ~2000-character response, a
response made mostly of emoji and CJK text, and a prompt containing a code
block.

The preference signal
---------------------
The signal is deliberately trivial so that a ~1M-parameter model trained on
~300 pairs can pick it up and show it in greedy generations: every chosen
final response ends with the exact closing sentence ``"I hope this helps!"``
(the stored text ends with it, no trailing whitespace), while the rejected
final response covers similar content more curtly and never contains that
sentence anywhere (it ends with something like ``"That's it."``, ``"Done."``
or just the last content sentence).  :func:`shows_preference_signal` is the
official checker: it returns ``True`` iff ``text.strip()`` ends with exactly
``"I hope this helps!"`` (case-, punctuation- and spelling-sensitive; only
surrounding whitespace is ignored).  As a secondary, *unofficial* cue, chosen
responses much more often begin with a friendly opener ("Great question!",
"Happy to help!") than rejected ones.  Earlier (shared) assistant turns in
multi-turn rows are neutral and never contain the closing sentence.

Run ``python sample.py`` (or ``python -m wspo.embedded.sample``) to
regenerate the files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "data" / "ultrafeedback_sample"

#: The fixed closing sentence that marks every chosen response.
CLOSING = "I hope this helps!"

N_TRAIN = 400  # including the special rows
N_TEST = 100
SYSTEM_SHARE = 0.15
MULTI_TURN_SHARE = 0.15
CODE_PROB = 0.75  # share of programming rows whose answer has a code block
DECORATE_PROB = 0.2  # share of rows with an extra non-ASCII sentence
WHITESPACE_PROB = 0.12  # share of rows with unusual whitespace separators


def shows_preference_signal(text: str) -> bool:
    """Return True iff ``text`` (ignoring surrounding whitespace) ends with
    exactly ``"I hope this helps!"``.

    This is the official preference signal of the sample dataset: it holds
    for every chosen final response and for no rejected one.  The match is
    exact (case, spelling and the final ``!`` matter); only leading and
    trailing whitespace is ignored.
    """
    if not isinstance(text, str):
        return False
    return text.strip().endswith(CLOSING)


# --------------------------------------------------------------------------
# Template pieces
# --------------------------------------------------------------------------


def _code(src: str) -> str:
    return "```python\n" + src.strip("\n") + "\n```"


_PROGRAMMING_ITEMS = [
    (
        "reverse a list",
        "Slicing with a step of -1 creates a reversed copy, while list.reverse() changes the list in place.",
        '''
def reverse_list(items):
    """Return a new list in reverse order."""
    return items[::-1]


numbers = [1, 2, 3, 4]
print(reverse_list(numbers))  # [4, 3, 2, 1]
''',
    ),
    (
        "read a file line by line",
        "Iterating over an open file object reads one line at a time, so even huge files use little memory.",
        '''
from pathlib import Path

def read_lines(path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield line.rstrip("\\n")


for line in read_lines(Path("notes.txt")):
    print(line)
''',
    ),
    (
        "count word frequencies",
        "The Counter class from the collections module counts hashable items and can list the most common ones.",
        '''
from collections import Counter

text = "the cat and the hat"
counts = Counter(text.split())

for word, n in counts.most_common(2):
    print(f"{word}\\t{n}")
''',
    ),
    (
        "remove duplicates from a list while keeping order",
        "A set remembers what you have already seen, and a second list keeps the original order of the items.",
        '''
def dedupe(items):
    seen = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result

print(dedupe([3, 1, 3, 2, 1]))  # [3, 1, 2]
''',
    ),
    (
        "merge two dictionaries",
        "Unpacking both dictionaries into a new one merges them, and keys from the second dictionary win.",
        '''
defaults = {"color": "blue", "size": 3}
overrides = {"size": 5}

merged = {**defaults, **overrides}
print(merged)  # {'color': 'blue', 'size': 5}
''',
    ),
    (
        "flatten a nested list",
        "A small recursive generator can walk into sublists and yield the plain values one by one.",
        '''
def flatten(nested):
    for item in nested:
        if isinstance(item, list):
            yield from flatten(item)
        else:
            yield item


print(list(flatten([1, [2, [3, 4]], 5])))
''',
    ),
    (
        "check whether a string is a palindrome",
        "Normalize the text first by keeping only letters and digits in lower case, then compare it with its reverse.",
        '''
def is_palindrome(text):
    cleaned = [c.lower() for c in text if c.isalnum()]
    return cleaned == cleaned[::-1]

print(is_palindrome("Never odd or even"))  # True
''',
    ),
    (
        "sort a list of tuples by the second element",
        "The sort method accepts a key function, so you can tell it to compare the second element of each tuple.",
        '''
pairs = [("apple", 3), ("kiwi", 1), ("fig", 2)]

pairs.sort(key=lambda pair: pair[1])
print(pairs)  # [('kiwi', 1), ('fig', 2), ('apple', 3)]
''',
    ),
    (
        "compute a factorial",
        "A factorial multiplies all whole numbers from 1 up to n, and a simple loop does this without recursion limits.",
        '''
def factorial(n):
    result = 1
    for k in range(2, n + 1):
        result *= k
    return result


print(factorial(5))  # 120
''',
    ),
    (
        "parse a JSON string",
        "The json module turns a JSON string into ordinary dictionaries and lists with a single call to json.loads.",
        '''
import json

raw = '{"name": "Zoë", "langs": ["日本語", "English"]}'
data = json.loads(raw)

print(data["name"], len(data["langs"]))
''',
    ),
    (
        "measure how long a function takes",
        "The time.perf_counter function gives a high-resolution clock that is ideal for timing short pieces of code.",
        '''
import time

def timed(func, *args):
    start = time.perf_counter()
    value = func(*args)
    elapsed = time.perf_counter() - start
    return value, elapsed

print(timed(sum, range(1_000_000)))
''',
    ),
    (
        "split a list into chunks",
        "Stepping through the indices with range and slicing gives you fixed-size chunks, and the last one may be shorter.",
        '''
def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]

print(list(chunks(list(range(7)), 3)))  # [[0, 1, 2], [3, 4, 5], [6]]
''',
    ),
]

# Each topic: name, role (for system prompts), items as (slot, fact, [code]),
# prompt templates, contexts, generic body sentences, decorations.
TOPICS = [
    {
        "name": "cooking",
        "role": "cooking teacher",
        "weight": 1,
        "items": [
            ("risotto", "Risotto gets its creamy texture from stirring short-grain rice while you add warm stock a ladle at a time."),
            ("sourdough bread", "Sourdough bread relies on a lively starter, so feed it a few hours before you mix the dough."),
            ("a French omelette", "A French omelette is cooked gently over medium-low heat and rolled while the center is still soft."),
            ("pad thai", "Pad thai comes together quickly once the rice noodles are soaked and the tamarind sauce is mixed."),
            ("miso soup (味噌汁)", "Miso soup (味噌汁) starts with dashi, and the miso paste should be dissolved off the boil to keep its aroma."),
            ("crème brûlée", "Crème brûlée needs a gentle water bath in the oven and a thin, even layer of sugar for the torch."),
            ("shoyu ramen (醤油ラーメン)", "Shoyu ramen (醤油ラーメン) balances a clear broth with a soy-based tare that you add to each bowl."),
            ("guacamole", "Guacamole tastes best with ripe avocados, lime juice, salt, and a little finely chopped onion."),
            ("a vegetable curry", "A vegetable curry builds flavor when you fry the spices in oil before adding the vegetables and liquid."),
            ("fluffy pancakes", "Fluffy pancakes come from a slightly lumpy batter that is mixed briefly and rested for a few minutes."),
            ("jiaozi dumplings (饺子)", "Jiaozi dumplings (饺子) are sealed by pressing small pleats along one side of the wrapper."),
            ("ratatouille", "Ratatouille is richer when each vegetable is browned separately before everything simmers together."),
            ("crêpes", "Crêpes need a thin batter and a hot, lightly buttered pan so each side cooks in under a minute."),
            ("cafe\u0301 au lait", "Cafe\u0301 au lait is simply strong brewed coffee mixed with an equal amount of hot, steamed milk."),
            ("a Spanish tortilla", "A Spanish tortilla is made by slowly cooking potatoes and onion in olive oil before adding the eggs."),
        ],
        "templates": [
            "How do I make {item}?",
            "Any tips for making {item} {ctx}?",
            "What mistakes should I avoid when making {item}?",
            "I'm cooking {item} {ctx}. Where should I start?",
            "Can you walk me through making {item} {ctx}?",
            "What's the most important step when cooking {item}?",
        ],
        "contexts": [
            "for a dinner party", "on a busy weeknight", "for two people",
            "with limited equipment", "for the first time", "for a family of five",
            "in a small kitchen", "on a budget",
        ],
        "generic": [
            "Read the whole recipe first and set out every ingredient before you turn on the stove.",
            "Taste as you go and adjust the salt near the end, because flavors concentrate while cooking.",
            "A heavy pan spreads heat evenly and makes the whole process much more forgiving.",
            "Season in small amounts, since it is easy to add more and hard to take it away.",
            "Let the finished dish rest for a minute or two so the flavors settle before serving.",
            "Write down what you changed each time, and your next batch will be even better.",
            "Keep your knife sharp, because a dull blade slips and makes chopping slower.",
        ],
        "decorations": [
            "Bon appétit 🍜!",
            "Enjoy your meal, or as they say in Japan, いただきます 🙏🏻.",
            "Serve it like a little cafe\u0301 would, on a warm plate 🍽️.",
            "Cooking with friends is even better 👩🏾‍🍳👨🏻‍🍳.",
        ],
    },
    {
        "name": "programming",
        "role": "Python tutor",
        "weight": 2,
        "items": _PROGRAMMING_ITEMS,
        "templates": [
            "How do I {item} in Python?",
            "What's the cleanest way to {item} in Python?",
            "Can you show me how to {item} in Python {ctx}?",
            "I'm learning Python. How can I {item}?",
            "Quick question: how would you {item} in Python {ctx}?",
            "Is there an idiomatic way to {item} {ctx}?",
        ],
        "contexts": [
            "as a beginner", "without external libraries", "for a small script",
            "in a readable way", "for a job interview", "in Python 3",
            "for a data-cleaning task",
        ],
        "generic": [
            "Give the function a descriptive name so the intent is obvious when you read it later.",
            "Try it in the interactive interpreter first, then move it into your script once it works.",
            "A short test with a couple of edge cases, such as an empty list, will catch mistakes early.",
            "The standard library often has a helper for jobs like this, so check the docs before writing your own.",
            "Keep the logic in a small function so it is easy to reuse and to test.",
            "Type hints are optional, but they make the code easier to read for the next person.",
        ],
        "decorations": [
            "Happy coding 👩‍💻!",
            "Keep experimenting, it is the fastest way to learn 🧑🏽‍💻.",
            "Don't be naïve about edge cases like empty input ⚠️.",
            "プログラミングを楽しんでください 🐍.",
        ],
    },
    {
        "name": "travel",
        "role": "travel guide",
        "weight": 1,
        "items": [
            ("Kyoto", "Kyoto (京都) has more than a thousand temples, so pick two or three areas instead of trying to see everything."),
            ("Lisbon", "Lisbon is built on steep hills, and the old trams are a charming way to reach the viewpoints (miradouros)."),
            ("Reykjavík", "Reykjavík is a good base for day trips to waterfalls, hot springs, and black-sand beaches."),
            ("Montréal", "Montréal mixes French and English, and a simple « bonjour » is always appreciated in shops and cafés."),
            ("São Paulo", "São Paulo is huge, so plan your days by neighborhood and use the metro to skip the traffic."),
            ("Zürich", "Zürich is compact and walkable, and the lake is lovely for a swim on a warm afternoon."),
            ("Seoul", "Seoul (서울) has excellent public transport, and a rechargeable T-money card works on buses and the subway."),
            ("Marrakech", "Marrakech's medina is a maze of souks, so a downloaded offline map will save you a lot of wandering."),
            ("Kraków", "Kraków's old town and Wawel Castle are close together, which makes a relaxed walking day easy."),
            ("Hanoi", "Hanoi's Old Quarter is busy with scooters, so cross the street at a slow, steady pace."),
            ("Tromsø", "Tromsø is one of the best places to see the northern lights between late September and March."),
            ("Tokyo", "Tokyo (東京) is easiest to explore with an IC card such as Suica, which works on trains and in convenience stores."),
            ("Córdoba", "Córdoba's Mezquita is the highlight, and visiting early in the morning helps you avoid the crowds."),
        ],
        "templates": [
            "What should I know before visiting {item}?",
            "I'm planning a trip to {item} {ctx}. Any tips?",
            "How many days do I need in {item}?",
            "What's the best way to get around {item}?",
            "Can you help me plan a visit to {item} {ctx}?",
            "Is {item} a good destination {ctx}?",
        ],
        "contexts": [
            "in spring", "with kids", "on a tight budget", "for a long weekend",
            "in winter", "as a solo traveler", "for my honeymoon",
        ],
        "generic": [
            "Book accommodation near public transport so early starts and late returns stay easy.",
            "Carry a little local cash, because small shops and markets do not always take cards.",
            "Learn a few polite phrases in the local language, since people usually respond warmly.",
            "Leave one afternoon unplanned so you can follow a recommendation or simply rest.",
            "Check the opening days of museums in advance, because many close one day a week.",
            "Comfortable shoes matter more than almost anything else you pack.",
        ],
        "decorations": [
            "Bon voyage ✈️!",
            "Enjoy the trip and take lots of photos 📸🌍.",
            "Have a great time, 楽しい旅を 🧳.",
            "Try a local café for breakfast, it is the best way to start the day ☕🥐.",
        ],
    },
    {
        "name": "science",
        "role": "science teacher",
        "weight": 1,
        "items": [
            ("photosynthesis", "Photosynthesis lets plants turn sunlight, water, and carbon dioxide into sugar, releasing oxygen as a by-product."),
            ("black holes", "A black hole is a region where gravity is so strong that not even light can escape once it crosses the event horizon."),
            ("plate tectonics", "Plate tectonics describes how Earth's outer shell is split into plates that drift a few centimeters each year."),
            ("the water cycle", "The water cycle moves water through evaporation, condensation into clouds, and precipitation back to the ground."),
            ("DNA replication", "During DNA replication the double helix unzips and each strand serves as a template for a new partner strand."),
            ("the Doppler effect", "The Doppler effect is the change in pitch you hear when a siren moves toward you and then away from you."),
            ("the ångström unit", "An ångström (Å) is 10⁻¹⁰ metres, a handy scale for the size of atoms and chemical bonds."),
            ("entropy", "Entropy counts how many microscopic arrangements match what we observe, and in an isolated system it tends to increase."),
            ("how vaccines work", "Vaccines train the immune system by showing it a harmless piece or version of a germ before a real infection."),
            ("ocean tides", "Ocean tides are caused mainly by the Moon's gravity pulling on the oceans, with a smaller effect from the Sun."),
            ("the speed of light", "Light travels at about 299,792 km/s in a vacuum, which is why sunlight takes roughly eight minutes to reach us."),
            ("why the sky is blue", "The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more than red ones."),
        ],
        "templates": [
            "Can you explain {item} {ctx}?",
            "What is the key idea behind {item}?",
            "I keep getting confused by {item}. Can you help?",
            "Explain {item} {ctx}.",
            "What's a good way to think about {item}?",
        ],
        "contexts": [
            "to a ten-year-old", "in plain language", "for my exam tomorrow",
            "in a few sentences", "like I'm new to science", "with an everyday analogy",
        ],
        "generic": [
            "A simple diagram or sketch often makes this idea click faster than a page of text.",
            "Scientists tested this idea with careful measurements, which is why we trust it today.",
            "Try connecting it to something you see every day, since that makes it easier to remember.",
            "If you want to go deeper, an introductory textbook chapter on the topic is a great next step.",
            "It is normal for this to feel strange at first, and most people need to hear it a few times.",
        ],
        "decorations": [
            "Science is full of wonders 🔬🧪.",
            "Stay curious 🧑🏿‍🔬!",
            "科学は楽しいです 🌌.",
            "Even the Ångström-sized details have a story to tell ⚛️.",
        ],
    },
    {
        "name": "maths",
        "role": "maths tutor",
        "weight": 1,
        "items": [
            ("prime numbers", "A prime number has exactly two divisors, 1 and itself, so 2, 3, 5, 7 and 11 are the first few."),
            ("the Pythagorean theorem", "The Pythagorean theorem says that in a right triangle a² + b² = c², where c is the longest side."),
            ("derivatives", "A derivative measures how fast a function changes, like the slope of a curve at a single point."),
            ("logarithms", "A logarithm answers the question of which power gives a number, so log₁₀(1000) = 3."),
            ("the quadratic formula", "The quadratic formula x = (−b ± √(b² − 4ac)) / 2a solves any equation of the form ax² + bx + c = 0."),
            ("matrix multiplication", "In matrix multiplication each entry is the dot product of a row from the first matrix and a column from the second."),
            ("standard deviation", "Standard deviation (σ) tells you how spread out values are around their average."),
            ("the number π", "The number π ≈ 3.14159 is the ratio of any circle's circumference to its diameter, and its digits never repeat."),
            ("modular arithmetic", "Modular arithmetic works like a clock, so 10 + 5 ≡ 3 (mod 12)."),
            ("independent probabilities", "For independent events you multiply probabilities, so two fair coins both land heads with probability ½ × ½ = ¼."),
            ("adding fractions", "To add fractions, rewrite them with a common denominator first, so 1/3 + 1/4 = 4/12 + 3/12 = 7/12."),
        ],
        "templates": [
            "Can you explain {item} {ctx}?",
            "I don't understand {item}. Can you help?",
            "What's an easy way to remember {item}?",
            "Why is it worth learning about {item}?",
            "Teach me {item} {ctx}.",
        ],
        "contexts": [
            "for a high-school student", "step by step", "with an example",
            "before my quiz", "in simple terms", "without heavy notation",
        ],
        "generic": [
            "Work through one small example by hand before trying harder problems.",
            "Checking your answer with a quick estimate is a good habit that catches many slips.",
            "Writing each step on its own line makes mistakes much easier to spot.",
            "Practice a few problems every day rather than many in one sitting.",
            "Drawing a picture often reveals the structure of the problem.",
        ],
        "decorations": [
            "Maths can be beautiful ∑ ✨.",
            "You've got this 💪🏾!",
            "数学加油！Keep practicing 📐.",
            "Don't be nai\u0308ve about skipping steps, write them all down ✏️.",
        ],
    },
    {
        "name": "writing",
        "role": "writing coach",
        "weight": 1,
        "items": [
            ("a cover letter", "A strong cover letter opens with the role you want and one concrete reason you are a good fit."),
            ("a short story", "A short story works best when one character wants something clear and meets an obstacle early."),
            ("a haiku", "A haiku traditionally uses 5-7-5 syllables, like Bashō's 古池や 蛙飛び込む 水の音 about a frog and an old pond."),
            ("a persuasive speech", "A persuasive speech should state its main claim early and support it with two or three strong reasons."),
            ("an email subject line", "A good email subject line is short, specific, and tells the reader what action is needed."),
            ("a product review", "A helpful product review explains who the product suits, what worked, and what could be better."),
            ("a thank-you note", "A thank-you note feels sincere when it names the specific thing you are grateful for."),
            ("a blog post introduction", "A blog post introduction should promise the reader a clear benefit within the first two sentences."),
            ("a character description", "A memorable character description shows one vivid habit instead of listing every physical detail."),
            ("a re\u0301sume\u0301 summary", "A re\u0301sume\u0301 summary should fit in three lines and highlight the one result you are proudest of."),
            ("a wedding toast", "A wedding toast is best kept under three minutes, with one warm story and a clear raise of the glass."),
        ],
        "templates": [
            "How do I write {item}?",
            "Can you give me tips for writing {item} {ctx}?",
            "I'm stuck on {item}. What should I do?",
            "What makes {item} good?",
            "Help me improve {item} {ctx}.",
        ],
        "contexts": [
            "for work", "for a friend", "in English as a second language",
            "under a tight deadline", "for a competition", "for a school assignment",
        ],
        "generic": [
            "Write a rough first draft quickly and save the polishing for a second pass.",
            "Reading your text aloud is the fastest way to catch clumsy sentences.",
            "Cut any sentence that does not serve the main point.",
            "Concrete details are more convincing than general statements.",
            "Ask a friend to read it and tell you which part they remember best.",
        ],
        "decorations": [
            "Happy writing ✍🏻!",
            "Even a naïve first draft is better than a blank page 📝.",
            "Bonne chance, et bon courage 🤞🏼.",
            "書くことを楽しんでください 📖.",
        ],
    },
    {
        "name": "history",
        "role": "history teacher",
        "weight": 1,
        "items": [
            ("the fall of the Western Roman Empire", "The Western Roman Empire fell in 476 CE after decades of political instability, economic strain, and invasions."),
            ("the printing press", "Gutenberg's printing press, built around 1440, made books cheaper and helped ideas spread across Europe."),
            ("the Silk Road", "The Silk Road was a network of trade routes linking China with Central Asia, the Middle East, and Europe."),
            ("the Meiji Restoration (明治維新)", "The Meiji Restoration (明治維新) began in 1868 and rapidly modernized Japan's government, army, and industry."),
            ("the French Revolution", "The French Revolution began in 1789 and overturned the monarchy in the name of liberté, égalité, fraternité."),
            ("the Apollo 11 landing", "Apollo 11 landed on the Moon on 20 July 1969, and Neil Armstrong was the first person to step onto its surface."),
            ("the Tang dynasty (唐朝)", "The Tang dynasty (唐朝, 618–907) is remembered as a golden age of Chinese poetry, trade, and culture."),
            ("the Industrial Revolution", "The Industrial Revolution started in Britain in the late 1700s, when steam power and factories transformed work."),
            ("the Renaissance", "The Renaissance was a revival of art and learning that began in Italian cities such as Florence in the 1300s."),
            ("the building of the Great Pyramid", "The Great Pyramid of Giza was built around 2560 BCE, probably by organized teams of paid workers."),
            ("the Magna Carta", "The Magna Carta of 1215 limited the English king's power and became a symbol of the rule of law."),
        ],
        "templates": [
            "Can you summarize {item} {ctx}?",
            "Why was {item} important?",
            "What should I know about {item}?",
            "Tell me about {item} {ctx}.",
            "How would you explain {item} to a student?",
        ],
        "contexts": [
            "in a few sentences", "for a school project", "for a history podcast",
            "briefly", "for someone new to history", "for a museum visit",
        ],
        "generic": [
            "Historians still debate some of the details, so it helps to read more than one account.",
            "Looking at a map of the period makes the events much easier to follow.",
            "Primary sources such as letters and diaries bring the period to life.",
            "Its effects can still be seen in the institutions and ideas we have today.",
            "A timeline of the key dates is a useful way to organize what you learn.",
        ],
        "decorations": [
            "History is full of surprises 🏛️.",
            "温故知新 (learn from the past to understand the new) 📜.",
            "Die Geschichte lehrt uns viel, über alles 🗺️.",
            "Enjoy the journey back in time ⏳👩🏻‍🏫.",
        ],
    },
    {
        "name": "health",
        "role": "wellness coach",
        "weight": 1,
        "items": [
            ("start running", "To start running, alternate short jogging intervals with walking and add a little more jogging each week."),
            ("sleep better", "Going to bed and waking up at the same time every day is one of the most reliable ways to sleep better."),
            ("stretch after a workout", "Gentle stretches held for 20 to 30 seconds help your body cool down after a workout."),
            ("drink more water", "Keeping a refillable bottle within reach is the simplest way to drink more water during the day."),
            ("reduce screen time", "Turning off non-essential notifications is an easy first step to reduce screen time."),
            ("build a morning routine", "A morning routine sticks best when it starts with one small habit, such as a glass of water or a short walk."),
            ("learn to meditate", "To learn to meditate, start with five minutes a day focusing on the feeling of your breath."),
            ("improve my posture at a desk", "For better posture at a desk, keep the screen at eye level and your feet flat on the floor."),
        ],
        "templates": [
            "How can I {item}?",
            "What's the easiest way to {item} {ctx}?",
            "Any advice on how to {item}?",
            "I want to {item} {ctx}. Where do I begin?",
            "What's a realistic plan to {item} {ctx}?",
        ],
        "contexts": [
            "as a busy parent", "without buying equipment", "while working from home",
            "at 50", "this month", "on a night-shift schedule",
        ],
        "generic": [
            "Start small, because tiny habits are easier to keep than big resolutions.",
            "Track your progress for a couple of weeks so you can see what actually helps.",
            "Be patient with yourself, since most changes take about a month to feel natural.",
            "If you have a medical condition, check with a doctor before changing your routine.",
            "Pairing the new habit with something you already do every day makes it stick.",
        ],
        "decorations": [
            "Take care 🧘🏽‍♀️.",
            "You've got this 🏃🏻‍♂️💨!",
            "慢慢来，不要着急 🌱.",
            "A calm mind is a happy mind, as every Zen café owner knows 🍵.",
        ],
    },
]

CHOSEN_OPENERS = [
    "Great question!",
    "Happy to help!",
    "Sure, I'd be glad to help.",
    "Of course!",
    "What a fun question!",
    "Thanks for asking!",
    "Absolutely, let's go through it.",
    "Great question! 👍🏽",
    "Happy to help 😊!",
]
CHOSEN_OPENER_PROB = 0.85

REJECTED_OPENERS = ["Okay.", "Fine.", "Look.", "Right."]
REJECTED_OPENER_PROB = 0.12

REJECTED_ENDINGS = [
    "That's it.",
    "Done.",
    "That's all.",
    "Figure out the rest yourself.",
    "Not much more to say.",
    "",
    "",
    "",
]

SYSTEM_TEMPLATES = [
    "You are a helpful assistant.",
    "You are a friendly and patient {role}.",
    "Answer the user's question accurately and concisely.",
    "You are a knowledgeable {role}. Keep answers short.",
    "あなたは親切なアシスタントです。",
    "Tu es un assistant serviable et précis.",
]

# (follow-up user message, lead sentence of the final answer)
FOLLOW_UPS = [
    ("Thanks! Could you give me one more tip?", "Here is one more tip that makes a real difference."),
    ("That's helpful. What is the most common mistake people make?", "The most common mistake is rushing the early steps, so slow down and check your work as you go."),
    ("Can you say that more simply?", "In short, focus on the basics first and build from there."),
    ("How long does it usually take to get comfortable with this?", "Most people feel comfortable after a few weeks of regular practice."),
    ("Merci ! What should I do next?", "Next, try it once on your own and note anything that felt unclear."),
    ("ありがとう！ Any other advice?", "One more piece of advice is to keep notes, because they make the second attempt much easier."),
    ("OK. What if I only have ten minutes?", "With only ten minutes, focus on the single most important step and skip the extras."),
]

# Separator styles: (separator between body sentences, separator before the closing)
WHITESPACE_STYLES = [
    ("  ", "  "),          # double spaces
    ("\n\n", "\n\n"),      # paragraphs
    ("\n", "\n"),          # line breaks
    ("\n\t- ", "\n\n"),    # tab-indented bullets
    ("\n\n\n", "\n\n"),    # blank-line runs
    (" \t ", " "),         # tab inside a run of spaces
]

CHOSEN_SCORES = [7.0 + 0.5 * i for i in range(7)]    # 7.0 .. 10.0
REJECTED_SCORES = [1.0 + 0.5 * i for i in range(11)]  # 1.0 .. 6.0


# --------------------------------------------------------------------------
# Assembly helpers
# --------------------------------------------------------------------------


def _join(parts: list[str], sep: str, closing_sep: str | None = None) -> str:
    """Join sentences/code blocks; code blocks get blank lines around them."""
    out = ""
    prev_code = False
    n = len(parts)
    for i, part in enumerate(parts):
        if not part:
            continue
        is_code = part.startswith("```")
        if not out:
            out = part
        elif is_code or prev_code:
            out += "\n\n" + part
        elif closing_sep is not None and i == n - 1:
            out += closing_sep + part
        else:
            out += sep + part
        prev_code = is_code
    return out


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _row(prompt: str, shared: list[dict], chosen: str, rejected: str,
         rng: random.Random) -> dict:
    assert chosen.endswith(CLOSING) and shows_preference_signal(chosen)
    assert "I hope this helps" not in rejected
    assert not shows_preference_signal(rejected)
    for m in shared:
        assert "I hope this helps" not in m["content"]
    chosen_msgs = [dict(m) for m in shared] + [_msg("assistant", chosen)]
    rejected_msgs = [dict(m) for m in shared] + [_msg("assistant", rejected)]
    score_chosen = rng.choice(CHOSEN_SCORES)
    score_rejected = rng.choice(REJECTED_SCORES)
    assert score_chosen > score_rejected
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "chosen": chosen_msgs,
        "rejected": rejected_msgs,
        "messages": [dict(m) for m in chosen_msgs],
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def _pick_topic(rng: random.Random) -> dict:
    weights = [t["weight"] for t in TOPICS]
    return rng.choices(TOPICS, weights=weights, k=1)[0]


def _make_prompt(rng: random.Random, topic: dict, used: set[str]) -> tuple[str, tuple]:
    while True:
        item = rng.choice(topic["items"])
        template = rng.choice(topic["templates"])
        ctx = rng.choice(topic["contexts"])
        prompt = template.format(item=item[0], ctx=ctx)
        if prompt not in used:
            used.add(prompt)
            return prompt, item


def _regular_row(rng: random.Random, form: str, used: set[str]) -> dict:
    topic = _pick_topic(rng)
    prompt, item = _make_prompt(rng, topic, used)
    fact = item[1]
    code = _code(item[2]) if len(item) > 2 and rng.random() < CODE_PROB else None
    generics = rng.sample(topic["generic"], 4)
    decoration = rng.choice(topic["decorations"]) if rng.random() < DECORATE_PROB else None
    if rng.random() < WHITESPACE_PROB:
        sep, closing_sep = rng.choice(WHITESPACE_STYLES)
    else:
        sep, closing_sep = " ", " "
    chosen_opener = rng.choice(CHOSEN_OPENERS) if rng.random() < CHOSEN_OPENER_PROB else ""
    rejected_opener = rng.choice(REJECTED_OPENERS) if rng.random() < REJECTED_OPENER_PROB else ""
    rejected_end = rng.choice(REJECTED_ENDINGS)
    n_generic = rng.choice([1, 2, 2])

    shared: list[dict] = []
    if form == "system":
        shared.append(_msg("system", rng.choice(SYSTEM_TEMPLATES).format(role=topic["role"])))
    shared.append(_msg("user", prompt))

    if form == "multi":
        # Neutral first answer (shared), then a follow-up question.
        first = _join([fact, generics[3]], " ")
        follow_q, lead = rng.choice(FOLLOW_UPS)
        shared.append(_msg("assistant", first))
        shared.append(_msg("user", follow_q))
        chosen_body = [lead] + generics[:n_generic]
        rejected_body = [lead, generics[0]]
    elif code is not None:
        chosen_body = [fact, "Here is a small example:", code, generics[0]]
        rejected_body = [fact, code, generics[0]]
    else:
        chosen_body = [fact] + generics[:n_generic]
        rejected_body = [fact, generics[0]]

    if decoration:
        chosen_body = chosen_body + [decoration]
        rejected_body = rejected_body + [decoration]

    chosen = _join([chosen_opener] + chosen_body + [CLOSING], sep, closing_sep)
    rejected = _join([rejected_opener] + rejected_body + [rejected_end], sep,
                     closing_sep if rejected_end else None)
    return _row(prompt, shared, chosen, rejected, rng)


# --------------------------------------------------------------------------
# Deliberately unusual (but valid) train rows
# --------------------------------------------------------------------------

_LONG_PROMPT = (
    "Can you write a detailed guide to planning a week-long trip to Japan (日本), "
    "covering transport, food, etiquette, and budget?"
)
_LONG_CHOSEN = """Of course, here is a detailed guide for a week in Japan (日本).

Transport: If you plan to travel between several cities, compare the price of a Japan Rail Pass with individual Shinkansen tickets, because the pass is no longer a bargain for every itinerary. Inside cities, an IC card such as Suica or PASMO works on trains, subways, buses, and even in many convenience stores and vending machines. Trains are extremely punctual, so check the platform number and the car number printed on reserved tickets before the train arrives.

A sample week:
\t- Days 1-3: Tokyo (東京), with Asakusa, Shibuya, and a day trip to Nikkō or Kamakura.
\t- Days 4-6: Kyoto (京都), with Fushimi Inari early in the morning, Arashiyama, and a half day in Nara.
\t- Day 7: Osaka (大阪), for street food in Dōtonbori before you fly home.

Food: Try ramen, sushi, okonomiyaki, and a simple teishoku set meal at lunchtime, which is often the best value of the day. Convenience stores (コンビニ) sell surprisingly good onigiri, sandwiches, and salads, which makes breakfast cheap and easy. Many restaurants show plastic food models or picture menus, so pointing politely is perfectly fine.

Etiquette: Speak quietly on trains, queue in the marked lines on the platform, and carry your rubbish with you, since public bins are rare. Take your shoes off when you see a raised entrance or slippers at the door, and never stick chopsticks upright in a bowl of rice. Tipping is not expected, and a simple ありがとうございます (thank you very much) goes a long way.

Budget: A comfortable mid-range budget is roughly 15,000 to 25,000 yen (¥) per person per day, excluding long-distance trains. Business hotels are clean and compact, and booking them a few weeks ahead keeps prices reasonable. Keep some cash on hand, because smaller shops, temples, and rural buses do not always accept cards.

Enjoy every moment of the trip 🗾🍣🚄! I hope this helps!"""
_LONG_REJECTED = (
    "Get a rail pass if you move between cities and an IC card for local trains. "
    "Eat at convenience stores to save money, keep quiet on trains, and bring cash. "
    "That's it."
)

_EMOJI_PROMPT = "用表情符号和中文描述一下你的周末。(Describe your weekend with emoji and Chinese.)"
_EMOJI_CHOSEN = (
    "周末很开心！🌞🏞️🚴🏻‍♀️🍜🍵📚😴\n\n"
    "星期六：🚶‍♂️🌳🦆 公园散步，然后吃拉面 🍜。\n"
    "星期日：👩‍🍳🥟 包饺子，晚上看电影 🎬🍿。\n\n"
    "🥰🎉👍🏽 I hope this helps!"
)
_EMOJI_REJECTED = "周末还行。🌞🍜🎬 吃饭，睡觉。"

_CODE_PROMPT = (
    "Why does this function return None?\n\n"
    "```python\n"
    "def add(a, b):\n"
    "    result = a + b\n"
    "\n"
    "\n"
    "print(add(2, 3))\n"
    "```"
)
_CODE_CHOSEN = (
    "Good catch! The function computes `result` but never returns it, so Python "
    "returns None by default. Add a return statement:\n\n"
    "```python\n"
    "def add(a, b):\n"
    "    result = a + b\n"
    "    return result\n"
    "\n"
    "\n"
    "print(add(2, 3))  # 5\n"
    "```\n\n"
    "Now the call prints 5 as expected. I hope this helps!"
)
_CODE_REJECTED = "There's no return statement. Add `return result` at the end of the function."


def _special_rows(rng: random.Random) -> list[dict]:
    return [
        _row(_LONG_PROMPT, [_msg("user", _LONG_PROMPT)], _LONG_CHOSEN, _LONG_REJECTED, rng),
        _row(_EMOJI_PROMPT, [_msg("user", _EMOJI_PROMPT)], _EMOJI_CHOSEN, _EMOJI_REJECTED, rng),
        _row(_CODE_PROMPT, [_msg("user", _CODE_PROMPT)], _CODE_CHOSEN, _CODE_REJECTED, rng),
    ]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _forms(n: int, rng: random.Random) -> list[str]:
    n_sys = round(SYSTEM_SHARE * n)
    n_multi = round(MULTI_TURN_SHARE * n)
    forms = ["system"] * n_sys + ["multi"] * n_multi + ["single"] * (n - n_sys - n_multi)
    rng.shuffle(forms)
    return forms


def build_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Build the sample rows deterministically from ``seed``.

    Returns ``{"train_prefs": [...], "test_prefs": [...]}`` in the H4
    ``ultrafeedback_binarized`` layout.  Prompts are unique across both splits,
    so the test split is made of held-out prompts.
    """
    rng = random.Random(seed)
    used: set[str] = {_LONG_PROMPT, _EMOJI_PROMPT, _CODE_PROMPT}
    specials = _special_rows(rng)

    n_train_regular = N_TRAIN - len(specials)
    train = [_regular_row(rng, form, used) for form in _forms(n_train_regular, rng)]
    test = [_regular_row(rng, form, used) for form in _forms(N_TEST, rng)]

    for row in specials:
        train.insert(rng.randrange(len(train) + 1), row)

    train_prompts = {r["prompt"] for r in train}
    assert not any(r["prompt"] in train_prompts for r in test)
    return {"train_prefs": train, "test_prefs": test}


def neutral_sft_rows(train: list[dict], seed: int = 1) -> list[dict]:
    """The neutral SFT split: one conversation per train prompt, ending with its chosen or its
    rejected response by a fair coin (``random.Random(seed)``), so a model fine-tuned on it shows
    the preference signal about half the time and alignment has something to add (the paper SFTs
    on neutral chat data, UltraChat, before any preference step). Layout of H4 ``ultrachat_200k``:
    ``{"prompt", "prompt_id", "messages"}``."""
    rng = random.Random(seed)
    rows = []
    for row in train:
        messages = row["chosen"] if rng.random() < 0.5 else row["rejected"]
        rows.append({"prompt": row["prompt"], "prompt_id": row["prompt_id"], "messages": [dict(m) for m in messages]})
    return rows


def write_sample(out_dir: Path = SAMPLE_DIR) -> None:
    """Write ``train_prefs.jsonl``, ``test_prefs.jsonl`` and the neutral ``sft.jsonl`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = build_rows()
    splits["sft"] = neutral_sft_rows(splits["train_prefs"])
    for split, rows in splits.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)


if __name__ == "__main__":
    write_sample()
