"""A small deterministic generator of textbook-style lessons and exercises: phi's recipe in miniature.

Each document is topic x template x difficulty: a topic (sums, primes, gcd, fractions, speed, ...)
draws concrete numbers for a difficulty level and computes every answer it states; a template (lesson,
worked example, exercises with solutions, teacher-student dialogue) lays it out as prose and Python.
`documents(n, seed)` is a pure function of its arguments: the same call gives the same text anywhere.
`conversations(n, seed)` gives chats about the same topics (a student asks, a teacher answers), for
instruction tuning: [{role, content}] messages.
"""

import math
import random
from fractions import Fraction

LEVELS = ("beginner", "intermediate", "advanced")
NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Katherine", "Ken",
         "Margaret", "Niklaus", "Radia", "Tim", "Guido", "Sophie")
OPENERS = ("In this section we study {what}.", "Let us learn about {what}.", "This lesson is about {what}.",
           "Today's topic is {what}.", "We now turn to {what}.")
WHY = ("It appears again and again in programming.", "It is a small idea with many uses.",
       "Understanding it well makes later chapters easier.", "It trains careful, step-by-step thinking.")


def _sum_list(rng, level):
    nums = [rng.randint(1, 10 ** (level + 1)) for _ in range(3 + 2 * level)]
    total = sum(nums)
    return dict(
        what="adding up a list of numbers",
        idea="To add a list of numbers we keep a running total. We start at zero and add each number in turn. "
             "When the list ends, the running total is the sum.",
        code="def total(numbers):\n    result = 0\n    for n in numbers:\n        result += n\n    return result",
        call=f"total({nums})", result=str(total),
        steps=[f"running total after {n}: {sum(nums[:i + 1])}" for i, n in enumerate(nums)],
        question=f"What is the sum of {', '.join(map(str, nums))}?", answer=str(total))


def _factorial(rng, level):
    n = rng.randint(3, 4 + 3 * level)
    return dict(
        what="the factorial of a number",
        idea="The factorial of n, written n!, is the product 1 x 2 x ... x n. By convention 0! is 1. "
             "A recursive definition says n! = n x (n-1)!, which stops at 0! = 1.",
        code="def factorial(n):\n    if n == 0:\n        return 1\n    return n * factorial(n - 1)",
        call=f"factorial({n})", result=str(math.factorial(n)),
        steps=[f"{k}! = {math.factorial(k)}" for k in range(1, n + 1)],
        question=f"Compute {n}!.", answer=str(math.factorial(n)))


def _gcd(rng, level):
    g = rng.randint(2, 5 * level + 5)
    a, b = g * rng.randint(2, 9 * level), g * rng.randint(2, 9 * level)
    steps, x, y = [], a, b
    while y:
        steps.append(f"gcd({x}, {y}) = gcd({y}, {x % y})")
        x, y = y, x % y
    return dict(
        what="the greatest common divisor",
        idea="The greatest common divisor of two numbers is the largest number that divides both. Euclid's "
             "algorithm replaces the pair (a, b) by (b, a mod b) until the second number is zero.",
        code="def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a",
        call=f"gcd({a}, {b})", result=str(math.gcd(a, b)), steps=steps,
        question=f"Find the greatest common divisor of {a} and {b}.", answer=str(math.gcd(a, b)))


def _primes(rng, level):
    n = rng.randint(10, 30 * level + 20)
    primes = [p for p in range(2, n + 1) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
    return dict(
        what="prime numbers",
        idea="A prime number is a whole number greater than 1 whose only divisors are 1 and itself. To test "
             "a number we only need to try divisors up to its square root.",
        code="def is_prime(n):\n    if n < 2:\n        return False\n    d = 2\n    while d * d <= n:\n"
             "        if n % d == 0:\n            return False\n        d += 1\n    return True",
        call=f"[p for p in range(2, {n + 1}) if is_prime(p)]", result=str(primes),
        steps=[f"{p} has no divisor between 2 and {int(p ** 0.5)}" for p in primes[-3:]],
        question=f"How many primes are there up to {n}?", answer=str(len(primes)))


def _fibonacci(rng, level):
    n = rng.randint(5, 8 + 4 * level)
    fib = [0, 1]
    while len(fib) < n:
        fib.append(fib[-1] + fib[-2])
    return dict(
        what="the Fibonacci sequence",
        idea="The Fibonacci sequence starts with 0 and 1, and every later term is the sum of the two terms "
             "before it. Keeping only the last two terms lets us compute it with constant memory.",
        code="def fibonacci(n):\n    a, b = 0, 1\n    terms = []\n    for _ in range(n):\n        terms.append(a)\n"
             "        a, b = b, a + b\n    return terms",
        call=f"fibonacci({n})", result=str(fib[:n]),
        steps=[f"{fib[i - 2]} + {fib[i - 1]} = {fib[i]}" for i in range(2, min(n, 7))],
        question=f"What is term number {n} of the Fibonacci sequence, counting 0 as term 1?", answer=str(fib[n - 1]))


def _palindrome(rng, level):
    words = ["level", "python", "racecar", "noon", "stone", "refer", "kayak", "matrix", "rotor", "garden",
             "madam", "signal", "civic", "banana"]
    picked = rng.sample(words, 2 + level)
    return dict(
        what="palindromes",
        idea="A palindrome reads the same forwards and backwards. In Python, text[::-1] reverses a string, so "
             "a word is a palindrome exactly when it equals its own reverse.",
        code="def is_palindrome(text):\n    text = text.lower()\n    return text == text[::-1]",
        call=f"[is_palindrome(w) for w in {picked}]", result=str([w == w[::-1] for w in picked]),
        steps=[f"'{w}' reversed is '{w[::-1]}'" for w in picked],
        question=f"Which of {', '.join(picked)} are palindromes?",
        answer=", ".join(w for w in picked if w == w[::-1]) or "none of them")


def _word_count(rng, level):
    vocab = ["cat", "dog", "sun", "tree", "book", "river", "stone", "bird"][: 3 + level]
    words = [rng.choice(vocab) for _ in range(5 + 3 * level)]
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = max(counts, key=counts.get)
    return dict(
        what="counting words with a dictionary",
        idea="A dictionary maps keys to values. To count words we use each word as a key and its count as the "
             "value, adding one every time the word appears.",
        code="def count_words(text):\n    counts = {}\n    for word in text.split():\n"
             "        counts[word] = counts.get(word, 0) + 1\n    return counts",
        call=f"count_words({' '.join(words)!r})", result=str(counts),
        steps=[f"'{w}' appears {c} times" for w, c in counts.items()],
        question=f"In the text '{' '.join(words)}', which word appears most often?",
        answer=f"{top} ({counts[top]} times)")


def _sorting(rng, level):
    nums = rng.sample(range(1, 20 * level + 20), 4 + 2 * level)
    passes, arr = [], list(nums)
    for i in range(len(arr)):
        for j in range(len(arr) - 1 - i):
            if arr[j] > arr[j + 1]:
                arr[j], arr[j + 1] = arr[j + 1], arr[j]
        passes.append(f"after pass {i + 1}: {arr}")
    return dict(
        what="sorting a list with bubble sort",
        idea="Bubble sort walks through the list and swaps neighbours that are in the wrong order. After each "
             "pass the largest remaining number has bubbled to the end.",
        code="def bubble_sort(items):\n    items = list(items)\n    for i in range(len(items)):\n"
             "        for j in range(len(items) - 1 - i):\n            if items[j] > items[j + 1]:\n"
             "                items[j], items[j + 1] = items[j + 1], items[j]\n    return items",
        call=f"bubble_sort({nums})", result=str(sorted(nums)), steps=passes[:4],
        question=f"Sort {nums} from smallest to largest.", answer=str(sorted(nums)))


def _fractions(rng, level):
    a = Fraction(rng.randint(1, 4 * level + 2), rng.randint(2, 6 * level + 3))
    b = Fraction(rng.randint(1, 4 * level + 2), rng.randint(2, 6 * level + 3))
    d = a.denominator * b.denominator // math.gcd(a.denominator, b.denominator)
    return dict(
        what="adding fractions",
        idea="To add two fractions we rewrite both over a common denominator, add the numerators, and then "
             "simplify by dividing top and bottom by their greatest common divisor.",
        code="from fractions import Fraction\n\ndef add(a, b):\n    return Fraction(a) + Fraction(b)",
        call=f"add(Fraction({a.numerator}, {a.denominator}), Fraction({b.numerator}, {b.denominator}))",
        result=f"Fraction({(a + b).numerator}, {(a + b).denominator})",
        steps=[f"common denominator: {d}",
               f"{a} = {a.numerator * d // a.denominator}/{d} and {b} = {b.numerator * d // b.denominator}/{d}",
               f"sum: {a + b}"],
        question=f"What is {a} + {b}?", answer=str(a + b))


def _geometry(rng, level):
    w, h, r = rng.randint(2, 10 * level), rng.randint(2, 10 * level), rng.randint(1, 5 * level)
    return dict(
        what="areas of rectangles and circles",
        idea="The area of a rectangle is its width times its height. The area of a circle of radius r is "
             "pi times r squared, about 3.14159 times r times r.",
        code="import math\n\ndef rectangle_area(width, height):\n    return width * height\n\n"
             "def circle_area(radius):\n    return math.pi * radius ** 2",
        call=f"(rectangle_area({w}, {h}), round(circle_area({r}), 2))",
        result=str((w * h, round(math.pi * r * r, 2))),
        steps=[f"{w} x {h} = {w * h}", f"pi x {r} x {r} = {math.pi * r * r:.2f}"],
        question=f"A rectangle is {w} by {h} and a circle has radius {r}. Which has the larger area?",
        answer="the rectangle" if w * h > math.pi * r * r else "the circle")


def _speed(rng, level):
    t = rng.randint(1, 3 + level)
    v = rng.randint(3, 20 * level)
    d = v * t
    return dict(
        what="speed, distance and time",
        idea="Speed tells how much distance is covered per unit of time: speed = distance / time. If we know "
             "any two of the three quantities we can find the third.",
        code="def speed(distance_km, time_h):\n    return distance_km / time_h",
        call=f"speed({d}, {t})", result=str(d / t),
        steps=[f"distance = {d} km", f"time = {t} h", f"speed = {d} / {t} = {d / t:g} km/h"],
        question=f"A cyclist rides {d} km in {t} hours. What is the average speed?", answer=f"{d / t:g} km/h")


def _percent(rng, level):
    p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40]) + (level - 1)
    base = rng.randint(2, 20) * 10 ** level
    years = rng.randint(1, 1 + level)
    value = base * (1 + p / 100) ** years
    return dict(
        what="percentages and compound growth",
        idea="A percentage is a number out of a hundred. Growing by p percent multiplies by (1 + p/100); "
             "growing for several years multiplies by that factor once per year.",
        code="def grow(amount, percent, years):\n    for _ in range(years):\n"
             "        amount = amount * (1 + percent / 100)\n    return amount",
        call=f"round(grow({base}, {p}, {years}), 2)", result=str(round(value, 2)),
        steps=[f"year {k}: {base * (1 + p / 100) ** k:.2f}" for k in range(1, years + 1)],
        question=f"{base} grows by {p}% a year for {years} years. How much is it at the end?",
        answer=f"{value:.2f}")


def _binary(rng, level):
    n = rng.randint(2, 2 ** (4 + 2 * level))
    digits, x = [], n
    while x:
        digits.append(f"{x} // 2 = {x // 2} remainder {x % 2}")
        x //= 2
    return dict(
        what="binary numbers",
        idea="Computers store numbers in base two. To convert a number to binary, divide by two repeatedly "
             "and read the remainders from last to first.",
        code="def to_binary(n):\n    if n == 0:\n        return '0'\n    bits = ''\n    while n:\n"
             "        bits = str(n % 2) + bits\n        n //= 2\n    return bits",
        call=f"to_binary({n})", result=repr(bin(n)[2:]), steps=digits[:6],
        question=f"Write {n} in binary.", answer=bin(n)[2:])


def _dice(rng, level):
    target = rng.randint(2, 12)
    ways = sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == target)
    return dict(
        what="probability with two dice",
        idea="When all outcomes are equally likely, the probability of an event is the number of favourable "
             "outcomes divided by the number of outcomes. Two dice have 6 x 6 = 36 outcomes.",
        code="def probability_of_sum(target):\n    ways = 0\n    for a in range(1, 7):\n        for b in range(1, 7):\n"
             "            if a + b == target:\n                ways += 1\n    return ways / 36",
        call=f"probability_of_sum({target})", result=str(ways / 36),
        steps=[f"pairs summing to {target}: "
               + ", ".join(f"({a},{target - a})" for a in range(1, 7) if 1 <= target - a <= 6)],
        question=f"Two fair dice are rolled. What is the probability that they sum to {target}?",
        answer=f"{Fraction(ways, 36)}")


TOPICS = (_sum_list, _factorial, _gcd, _primes, _fibonacci, _palindrome, _word_count, _sorting, _fractions,
          _geometry, _speed, _percent, _binary, _dice)


def _lesson(rng, t, level):
    return (f"# Lesson: {t['what'].capitalize()} ({level})\n\n{rng.choice(OPENERS).format(what=t['what'])} "
            f"{rng.choice(WHY)}\n\n{t['idea']}\n\nHere is how we can write this in Python:\n\n"
            f"```python\n{t['code']}\n```\n\n"
            f"For example, `{t['call']}` returns `{t['result']}`.\n\nLet us check it by hand:\n"
            + "".join(f"- {s}\n" for s in t["steps"]) + "\nThe answer agrees with the program.\n")


def _worked(rng, t, level):
    return (f"## Worked example ({level}): {t['what']}\n\nProblem. {t['question']}\n\nSolution. {t['idea']} "
            "We work it out step by step.\n\n" + "".join(f"{i + 1}. {s}\n" for i, s in enumerate(t["steps"]))
            + f"\nSo the answer is {t['answer']}.\n\nA program confirms it:\n\n```python\n{t['code']}\n\n"
            f"print({t['call']})  # {t['result']}\n```\n")


def _exercises(rng, t, level, more):
    parts = [f"## Exercises on {t['what']} ({level})\n\n{t['idea']}\n"]
    for i, ex in enumerate([t] + more):
        parts.append(f"\nExercise {i + 1}. {ex['question']}\n")
    parts.append("\n### Solutions\n")
    for i, ex in enumerate([t] + more):
        parts.append(f"\n{i + 1}. {ex['answer']}. " + "; ".join(ex["steps"][:2]) + ".\n")
    return "".join(parts)


def _dialogue(rng, t, level):
    student, teacher = rng.sample(NAMES, 2)
    return (f"A conversation about {t['what']} ({level}).\n\n{student}: I do not understand {t['what']}. "
            f"Can you explain it?\n\n{teacher}: Of course. {t['idea']}\n\n{student}: Can you show me a case?\n\n"
            f"{teacher}: {t['question']} Let us think. " + "; then ".join(t["steps"][:4])
            + f". So the answer is {t['answer']}.\n\n{student}: How would a program do it?\n\n{teacher}: Like this:\n\n"
            f"```python\n{t['code']}\n```\n\nCalling `{t['call']}` gives `{t['result']}`.\n\n{student}: Thank you, "
            f"{teacher}!\n")


TEMPLATES = ("lesson", "worked", "exercises", "dialogue")


def document(index: int, seed: int = 0) -> str:
    """Document number `index`: topic, template and level cycle so every combination appears."""
    rng = random.Random(f"phi-jax-synthetic:{seed}:{index}")
    topic = TOPICS[index % len(TOPICS)]
    template = TEMPLATES[(index // len(TOPICS)) % len(TEMPLATES)]
    level = 1 + (index // (len(TOPICS) * len(TEMPLATES))) % len(LEVELS)
    t = topic(rng, level)
    name = LEVELS[level - 1]
    if template == "lesson":
        return _lesson(rng, t, name)
    if template == "worked":
        return _worked(rng, t, name)
    if template == "exercises":
        return _exercises(rng, t, name, [topic(rng, level) for _ in range(1 + level)])
    return _dialogue(rng, t, name)


def documents(n: int, seed: int = 0):
    """The first `n` documents for `seed` (a generator)."""
    return (document(i, seed) for i in range(n))


SYSTEM_PROMPTS = ("You are a patient teacher of mathematics and programming.", "Answer briefly and exactly.")


def conversation(index: int, seed: int = 0) -> list[dict]:
    """Chat number `index`: a question about a topic and its answer, then (more often at higher levels)
    the idea behind it and the Python for it; some with a system prompt."""
    rng = random.Random(f"phi-jax-chat:{seed}:{index}")
    topic = TOPICS[index % len(TOPICS)]
    level = 1 + (index // len(TOPICS)) % len(LEVELS)
    t = topic(rng, level)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": t["question"]},
                 {"role": "assistant", "content": f"The answer is {t['answer']}."}]
    follow_ups = [(f"Why? Explain {t['what']}.", t["idea"]),
                  ("How would a program do it?", f"Like this:\n```python\n{t['code']}\n```\n"
                                                 f"`{t['call']}` gives `{t['result']}`.")]
    for question, answer in follow_ups[:rng.randint(0, level - 1) if level > 1 else 0]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def conversations(n: int, seed: int = 0):
    """The first `n` chats for `seed` (a generator)."""
    return (conversation(i, seed) for i in range(n))
