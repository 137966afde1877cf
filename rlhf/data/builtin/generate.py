"""Writes the project's built-in datasets (run once; the output files are committed).

    python -m rlhf.data.builtin.generate

The data is written for this project so that a tiny model learns from it on a CPU in a
minute: short Chinese question/answer tasks with many distinct prompts (so a held-out split
measures generalisation), in two files:

- sft_zh.jsonl: BELLE shape (`instruction`, `input`, `output`). About half the answers close
  with a friendly sentence, so an SFT policy sometimes produces it and PPO can learn to
  produce it more often.
- preference_zh.jsonl: `prompt`, `chosen`, `rejected`. The chosen answer is correct and ends
  with the friendly closing; the rejected one is terse, wrong or off-topic. A reward model
  separates the two within a few hundred steps.
- arithmetic/arithmetic_zh.jsonl: `prompt`, `answer`: sums, differences and products phrased as
  in the two files above, with the number a verifiable reward checks (`rlhf.rewards.AnswerMatch`).
  In a folder of its own: the tiny model's tokenizer is trained on the two files above only.
- arithmetic/arithmetic_en.jsonl: the same kinds of sums, differences and products in English
  ("What is 55 + 87?"), 1000 distinct prompts: for real English models (SmolLM2), which the
  Chinese phrasing would test on the language instead of the arithmetic.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CLOSING = "希望这个回答对你有帮助！"

CAPITALS = {
    "中国": "北京", "日本": "东京", "法国": "巴黎", "英国": "伦敦", "德国": "柏林", "意大利": "罗马",
    "俄罗斯": "莫斯科", "美国": "华盛顿", "加拿大": "渥太华", "澳大利亚": "堪培拉", "埃及": "开罗",
    "印度": "新德里", "韩国": "首尔", "泰国": "曼谷", "西班牙": "马德里", "希腊": "雅典",
    "巴西": "巴西利亚", "阿根廷": "布宜诺斯艾利斯", "土耳其": "安卡拉", "越南": "河内",
}
ANTONYMS = {
    "大": "小", "高": "矮", "长": "短", "快": "慢", "冷": "热", "多": "少", "新": "旧", "早": "晚",
    "远": "近", "轻": "重", "胖": "瘦", "白天": "黑夜", "开心": "难过", "简单": "复杂",
    "安静": "吵闹", "干净": "肮脏", "前进": "后退", "成功": "失败", "开始": "结束", "上": "下",
}
WORDS = {
    "苹果": "apple", "香蕉": "banana", "猫": "cat", "狗": "dog", "书": "book", "水": "water",
    "太阳": "sun", "月亮": "moon", "学校": "school", "老师": "teacher", "朋友": "friend",
    "房子": "house", "汽车": "car", "电脑": "computer", "花": "flower", "树": "tree",
    "鱼": "fish", "鸟": "bird", "山": "mountain", "河": "river", "桌子": "table", "椅子": "chair",
    "音乐": "music", "城市": "city", "早饭": "breakfast",
}
COLORS = {
    "香蕉": "黄色", "草": "绿色", "天空": "蓝色", "雪": "白色", "煤炭": "黑色", "西红柿": "红色",
    "橙子": "橙色", "茄子": "紫色", "乌鸦": "黑色", "牛奶": "白色", "树叶": "绿色", "胡萝卜": "橙色",
}
OFF_TOPIC = ["今天天气很好。", "我喜欢吃面条。", "明天再说吧。", "这个问题很无聊。", "随便你。", "我在看电视。"]
TERSE = ["不知道。", "没听说过。", "自己查。", "不清楚。", "嗯。"]


def _tasks(rng: random.Random):
    """Yields (instruction, input, correct answer, a plausible wrong answer) without end."""
    while True:
        kind = rng.randrange(8)
        if kind == 0:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            yield f"计算{a}加{b}等于多少。", "", f"{a}加{b}等于{a + b}。", f"{a}加{b}等于{a + b + rng.randint(1, 9)}。"
        elif kind == 1:
            a, b = rng.randint(20, 99), rng.randint(1, 19)
            yield f"{a}减去{b}是多少？", "", f"{a}减去{b}等于{a - b}。", f"{a}减去{b}等于{a + b}。"
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            yield f"{a}乘以{b}等于几？", "", f"{a}乘以{b}等于{a * b}。", f"{a}乘以{b}等于{a + b}。"
        elif kind == 3:
            country, city = rng.choice(list(CAPITALS.items()))
            other = rng.choice([c for c in CAPITALS.values() if c != city])
            yield f"{country}的首都是哪里？", "", f"{country}的首都是{city}。", f"{country}的首都是{other}。"
        elif kind == 4:
            word, opposite = rng.choice(list(ANTONYMS.items()))
            yield f"“{word}”的反义词是什么？", "", f"“{word}”的反义词是“{opposite}”。", f"“{word}”的反义词是“{word}”。"
        elif kind == 5:
            zh, en = rng.choice(list(WORDS.items()))
            other = rng.choice([e for e in WORDS.values() if e != en])
            yield f"请把“{zh}”翻译成英文。", "", f"“{zh}”的英文是“{en}”。", f"“{zh}”的英文是“{other}”。"
        elif kind == 6:
            zh, en = rng.choice(list(WORDS.items()))
            other = rng.choice([z for z in WORDS if z != zh])
            yield "把下面的英文单词翻译成中文。", en, f"“{en}”的中文意思是“{zh}”。", f"“{en}”的中文意思是“{other}”。"
        else:
            thing, color = rng.choice(list(COLORS.items()))
            other = rng.choice([c for c in COLORS.values() if c != color])
            yield f"{thing}通常是什么颜色的？", "", f"{thing}通常是{color}的。", f"{thing}通常是{other}的。"


def _unique(rng: random.Random, count: int, taken: set):
    """`count` tasks whose (instruction, input) pairs are new, recorded in `taken`."""
    rows = []
    for instruction, input_text, answer, wrong in _tasks(rng):
        if (instruction, input_text) in taken:
            continue
        taken.add((instruction, input_text))
        rows.append((instruction, input_text, answer, wrong))
        if len(rows) == count:
            return rows


def main() -> None:
    rng = random.Random(20261121)
    taken: set = set()
    with open(HERE / "sft_zh.jsonl", "w", encoding="utf-8") as f:
        for instruction, input_text, answer, _ in _unique(rng, 600, taken):
            output = answer + CLOSING if rng.random() < 0.5 else answer
            f.write(json.dumps({"instruction": instruction, "input": input_text, "output": output}, ensure_ascii=False) + "\n")
    with open(HERE / "preference_zh.jsonl", "w", encoding="utf-8") as f:
        for instruction, input_text, answer, wrong in _unique(rng, 600, taken):
            prompt = f"{instruction}\n{input_text}" if input_text else instruction
            rejected = rng.choice([wrong, rng.choice(TERSE), rng.choice(OFF_TOPIC)])
            f.write(json.dumps({"prompt": prompt, "chosen": answer + CLOSING, "rejected": rejected}, ensure_ascii=False) + "\n")

    arithmetic = random.Random(20261129)  # its own generator: the files above stay as they were
    (HERE / "arithmetic").mkdir(exist_ok=True)
    with open(HERE / "arithmetic" / "arithmetic_zh.jsonl", "w", encoding="utf-8") as f:
        seen = set()
        for instruction, _, answer, _ in _tasks(arithmetic):
            if len(seen) == 300:
                break
            number = answer.rstrip("。").rsplit("等于", 1)[-1]
            if instruction in seen or not number.isdigit():  # arithmetic tasks only
                continue
            seen.add(instruction)
            f.write(json.dumps({"prompt": instruction, "answer": number}, ensure_ascii=False) + "\n")
    english = random.Random(20261205)
    with open(HERE / "arithmetic" / "arithmetic_en.jsonl", "w", encoding="utf-8") as f:
        seen = set()
        while len(seen) < 1000:
            prompt, answer = _english_arithmetic(english)
            if prompt not in seen:
                seen.add(prompt)
                f.write(json.dumps({"prompt": prompt, "answer": str(answer)}) + "\n")


def _english_arithmetic(rng: random.Random) -> tuple:
    """(prompt, answer): a two-digit sum, a difference or a product within 12 x 12."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return rng.choice([f"What is {a} + {b}?", f"Compute {a} plus {b}.", f"Add {a} and {b}."]), a + b
    if kind == 1:
        a, b = rng.randint(20, 99), rng.randint(1, 19)
        return rng.choice([f"What is {a} - {b}?", f"Compute {a} minus {b}.", f"Subtract {b} from {a}."]), a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return rng.choice([f"What is {a} x {b}?", f"Compute {a} times {b}.", f"Multiply {a} by {b}."]), a * b


if __name__ == "__main__":
    main()
