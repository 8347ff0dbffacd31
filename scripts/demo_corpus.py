"""A procedural corpus of short, simple English stories and story requests, for the demo model.

Every text comes from the small grammar in this file and a seeded ``random.Random``, so the corpus
is the same on every machine, needs no download, and is ours to license (MIT, like minillama).

Two kinds of documents:
- a story: one paragraph, 100 to 250 words, with a hero (a child or an animal), a setting, one of
  six plots (a lost toy, a new friend, a rainy day, learning a skill, sharing food, a treasure
  map) and dialogue;
- a conversation: a list of ``{"role", "content"}`` messages in which a user asks for a story
  (sometimes naming the hero, its name or the plot) and the assistant tells one that fits, or
  greets the user and says what it can do.
"""
import random
from dataclasses import dataclass

GIRL_NAMES = ["Lily", "Mia", "Emma", "Anna", "Sara", "Lucy", "Zoe", "Ella", "Rosa", "Nina", "Amy",
              "Kate", "Maya", "Ruby", "Ivy", "Grace", "Lena", "Alice", "Hana", "Olivia", "Sophie", "Leila"]
BOY_NAMES = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Omar", "Ravi", "Kai",
             "Jake", "Luke", "Dan", "Hugo", "Oscar", "Felix", "Adam", "Theo", "Milo", "Ali"]
ANIMALS = ["cat", "dog", "rabbit", "bear", "fox", "mouse", "duck", "frog", "pig", "lion", "owl", "horse"]
HERO_ADJECTIVES = ["little", "small", "kind", "happy", "curious", "brave", "clever", "cheerful", "shy", "funny"]
PLACES_TO_LIVE = ["in a small house near the forest", "in a big city", "on a farm", "by the sea",
                  "in a quiet village", "at the top of a green hill", "next to a wide river",
                  "in a little house by the woods", "in a cozy house by the lake"]
FAMILY = ["mom and dad", "grandma", "grandpa", "big sister", "little brother", "mom", "dad", "family"]
ACTIVITIES = ["play with {his} red ball", "draw pictures of animals", "read books about the stars",
              "sing songs in the garden", "run fast in the park", "look at the clouds",
              "build tall towers with blocks", "help {his} mom bake bread", "dance to music",
              "play hide and seek", "water the flowers", "collect pretty stones"]
# (toy, where it was found)
TOYS = ["red ball", "blue hat", "toy car", "teddy bear", "yellow kite", "shiny stone", "little boat",
        "wooden horse", "green scarf", "favorite book", "toy train", "soft blanket"]
SEARCH_PLACES = ["under the bed", "behind the door", "in the garden", "in the kitchen", "under the table",
                 "in the toy box", "behind the sofa", "in the closet", "under the big tree"]
FOUND_PLACES = ["under a big leaf", "behind the sofa", "in the dog's bed", "next to the old tree",
                "under a pile of clothes", "inside a flower pot", "on top of the shelf", "in the grass"]
OUTSIDE_PLACES = ["the park", "the forest", "the beach", "the garden", "the lake", "the meadow", "the hill"]
SMALL_ANIMALS = ["bird", "kitten", "puppy", "bunny", "duckling", "squirrel", "hedgehog", "turtle", "butterfly"]
ANIMAL_SPOTS = ["under a tree", "by the water", "on a big rock", "behind a bush", "near the path",
                "in the tall grass"]
GAMES = ["tag", "hide and seek", "with a ball", "in the sand", "by the river", "on the swings"]
FOODS = ["apple", "sandwich", "cookies", "orange", "cake", "banana", "bread", "grapes", "cheese"]
PLURAL_FOODS = {"cookies", "grapes"}
FOOD_WITH_ARTICLE = {"apple": "a big red apple", "sandwich": "a big sandwich", "cookies": "some cookies",
                     "orange": "a sweet orange", "cake": "a piece of cake", "banana": "a yellow banana",
                     "bread": "some warm bread", "grapes": "some green grapes", "cheese": "some cheese"}
# (what the family does inside, how the story says it happened)
INDOOR = [("build a fort with blankets", "they built a big fort with blankets and pillows"),
          ("bake some cookies", "they baked sweet cookies and ate them while they were warm"),
          ("paint a picture", "they painted a picture of a sunny day"),
          ("read a story together", "they read a story about a brave little ship"),
          ("play a board game", "they played a board game and laughed a lot"),
          ("make a puppet show", "they made puppets out of old socks and put on a show")]
# (the skill, how the first try failed, how it went in the end)
SKILLS = [("ride a bike", "{he} fell off the bike", "{he} rode the bike all the way down the street"),
          ("swim", "{he} swallowed some water and had to stop", "{he} swam across the pool"),
          ("climb the big tree", "{his} foot slipped and {he} slid down", "{he} climbed all the way to the top"),
          ("fly a kite", "the kite fell to the ground", "the kite flew high in the sky"),
          ("whistle", "only air came out", "{he} whistled a happy song"),
          ("skip with a rope", "the rope got stuck on {his} feet", "{he} skipped ten times without stopping"),
          ("tie {his} shoes", "the laces got all tangled", "{he} tied a perfect bow")]
HELP_WORDS = ["Do not give up", "Keep trying", "You can do it"]
TREASURES = ["a box full of old toys", "a garden full of beautiful flowers", "a little pond with golden fish",
             "a chest full of shiny coins", "a tree house with a tiny window", "a cave with sparkling stones"]
MAP_PLACES = ["behind the old barn", "under a loose stone", "in an old book", "inside a bottle on the beach"]
FEELINGS_HAPPY = ["very happy", "so happy", "full of joy"]
PLOTS = ["lost", "friend", "rain", "learn", "share", "map"]
# How a user names each plot when asking for a story about it.
PLOT_REQUESTS = {"lost": "who loses {his} {toy}", "friend": "who makes a new friend",
                 "rain": "on a rainy day", "learn": "who learns to {skill}",
                 "share": "who shares {his} {food}", "map": "who finds a treasure map"}
GREETINGS = {
    "Hello!": "Hello! I am a tiny story model. Ask me for a story, for example about a cat, a dog "
              "or a girl named Lily, and I will tell you one.",
    "Hi!": "Hi! I am a tiny story model. Ask me for a story, for example about a cat, a dog "
           "or a girl named Lily, and I will tell you one.",
    "Who are you?": "I am a tiny story model. I was trained to tell short stories about children and "
                    "animals. Ask me for a story and I will tell you one.",
    "What can you do?": "I can tell short stories about children and animals. Tell me who the story "
                        "should be about, and I will tell you one.",
    "Thank you!": "You are welcome! I hope you liked the story.",
}

SYSTEM_PROMPTS = ["You are a friendly storyteller.", "You tell short stories for children.",
                  "You are a helpful assistant."]


@dataclass(frozen=True)
class Hero:
    kind: str  # "girl", "boy", or an animal
    name: str
    female: bool

    @property
    def pronouns(self) -> dict:
        if self.female:
            return {"he": "she", "his": "her", "him": "her", "himself": "herself"}
        return {"he": "he", "his": "his", "him": "him", "himself": "himself"}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


class StoryWriter:
    """Writes stories from a seeded random generator; the same seed gives the same texts."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def hero(self, kind=None, name=None) -> Hero:
        r = self.rng
        if kind is None:
            kind = r.choice(["girl", "boy", "girl", "boy"] + ANIMALS)
        female = kind == "girl" or (kind != "boy" and r.random() < 0.5)
        if name is None:
            name = r.choice(GIRL_NAMES if female else BOY_NAMES)
        return Hero(kind, name, female)

    def friend(self, hero: Hero) -> Hero:
        while True:
            other = self.hero(kind=self.rng.choice(["girl", "boy"]))
            if other.name != hero.name:
                return other

    def story(self, hero=None, plot=None, details=None) -> str:
        """One story paragraph. ``details`` may fix the plot's toy, skill or food."""
        r = self.rng
        hero = hero or self.hero()
        plot = plot or r.choice(PLOTS)
        details = dict(details or {})
        p = hero.pronouns
        n = hero.name
        s = []  # sentences

        # -- opening: who, where, what they like --
        adj = r.choice(HERO_ADJECTIVES)
        where = r.choice(PLACES_TO_LIVE)
        opening = r.randrange(4)
        if opening == 0:
            s.append(f"Once upon a time, there was {_a(adj)} {hero.kind} named {n}.")
            s.append(f"{_cap(p['he'])} lived {where} with {p['his']} {r.choice(FAMILY)}.")
        elif opening == 1:
            s.append(f"Once upon a time, {where}, there lived {_a(adj)} {hero.kind} named {n}.")
        elif opening == 2:
            s.append(f"There was once {_a(adj)} {hero.kind} named {n}.")
            s.append(f"{_cap(p['he'])} lived {where}.")
        else:
            s.append(f"{n} was {_a(adj)} {hero.kind} who lived {where}.")
        activity = r.choice(ACTIVITIES).format(**p)
        s.append(r.choice([f"{n} liked to {activity}.", f"Every day, {p['he']} loved to {activity}.",
                           f"{_cap(p['his'])} favorite thing was to {activity}."]))

        # -- the plot --
        getattr(self, f"_plot_{plot}")(hero, s, details)

        # -- ending --
        if plot != "rain" and r.random() < 0.5:
            s.append(r.choice(["It was the best day ever.", f"That night, {n} went to bed with a big smile.",
                               f"{n} would never forget that day.", "It was a wonderful day."]))
        return " ".join(s)

    def _plot_lost(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        toy = details.get("toy") or r.choice(TOYS)
        helper = self.friend(hero)
        s.append(r.choice([f"{n} had {_a(toy)} that {p['he']} loved very much.",
                           f"{_cap(p['his'])} favorite toy was {_a(toy)}."]))
        s.append(r.choice([f"One day, {p['he']} could not find {p['his']} {toy}.",
                           f"One morning, the {toy} was gone!"]))
        places = r.sample(SEARCH_PLACES, 3)
        s.append(f"{n} looked {places[0]}. {_cap(p['he'])} looked {places[1]}. "
                 f"{_cap(p['he'])} looked {places[2]}. But the {toy} was not there.")
        s.append(r.choice([f"{n} felt very sad and started to cry.", f"{n} was very sad."]))
        s.append(f"Then {p['his']} friend {helper.name} came to play.")
        s.append(f"\"What is wrong, {n}?\" asked {helper.name}.")
        s.append(f"\"I can not find my {toy},\" said {n}.")
        s.append(f"\"Do not worry. I will help you,\" said {helper.name}.")
        s.append(f"They looked everywhere together. At last, {helper.name} found the {toy} "
                 f"{r.choice(FOUND_PLACES)}.")
        s.append(f"{n} was {r.choice(FEELINGS_HAPPY)}. \"Thank you, {helper.name}!\" {p['he']} said, "
                 f"and gave {helper.pronouns['him']} a big hug.")
        if r.random() < 0.5:
            s.append(f"From that day on, {n} always put {p['his']} {toy} in a safe place.")

    def _plot_friend(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        animal = r.choice(SMALL_ANIMALS)
        place = r.choice(OUTSIDE_PLACES)
        s.append(f"One day, {n} went to {place}.")
        s.append(f"There, {p['he']} saw a little {animal} {r.choice(ANIMAL_SPOTS)}. The {animal} looked sad.")
        s.append(f"\"Why are you sad, little {animal}?\" asked {n}.")
        problem = r.randrange(3)
        if problem == 0:
            s.append(f"\"I am lost, and I can not find my home,\" said the {animal}.")
            s.append(f"\"I will help you,\" said {n}.")
            s.append(f"They walked together along the path until they found the {animal}'s home. "
                     f"The {animal}'s mom was very happy to see it again.")
        elif problem == 1:
            s.append(f"\"I have no friends to play with,\" said the {animal}.")
            s.append(f"\"I can be your friend,\" said {n} with a smile.")
            s.append(f"They played {r.choice(GAMES)} all day long.")
        else:
            food = r.choice(FOODS)
            s.append(f"\"I am very hungry,\" said the {animal}.")
            it = "them" if food in PLURAL_FOODS else "it"
            s.append(f"{n} gave the {animal} some of {p['his']} {food}. The {animal} ate {it} and smiled.")
            s.append(f"\"Thank you, {n}! You are very kind,\" said the {animal}.")
        s.append(f"From that day on, {n} and the {animal} were best friends.")

    def _plot_rain(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        grown_up = r.choice(["mom", "dad", "grandma", "grandpa"])
        inside, happened = r.choice(INDOOR)
        s.append(f"One day, {n} wanted to play outside, but it was raining.")
        s.append(f"{_cap(p['he'])} looked out of the window and felt sad.")
        s.append(f"\"Do not be sad,\" said {p['his']} {grown_up}. \"Let us {inside}.\"")
        s.append(f"So {happened}. It was a lot of fun.")
        s.append(f"Soon, the rain stopped and the sun came out. {n} saw a big rainbow in the sky.")
        s.append(f"\"Look, a rainbow!\" {p['he']} said. {n} and {p['his']} {grown_up} went outside "
                 f"to jump in the puddles.")
        s.append("It was a very good day after all.")

    def _plot_learn(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        skill, fail, success = details.get("skill") or r.choice(SKILLS)
        skill, fail, success = skill.format(**p), fail.format(**p), success.format(**p)
        helper = r.choice(["mom", "dad", "grandma", "grandpa", "big sister", "big brother"])
        s.append(f"One day, {n} wanted to learn how to {skill}.")
        s.append(f"{_cap(p['he'])} tried, but {fail}.")
        s.append(r.choice([f"{n} felt like giving up.", f"\"It is too hard,\" said {n}."]))
        s.append(f"\"{r.choice(HELP_WORDS)},\" said {p['his']} {helper}. \"Try again, and you will do it.\"")
        s.append(f"So {n} tried again, and again, and again.")
        s.append(f"At last, {success}!")
        s.append(f"\"I did it!\" {n} shouted. {_cap(p['he'])} was very proud of {p['himself']}.")
        if r.random() < 0.5:
            s.append(f"{n} learned that if you keep trying, you can do hard things.")

    def _plot_share(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        food = details.get("food") or r.choice(FOODS)
        friend = self.friend(hero)
        fp = friend.pronouns
        s.append(f"One day, {n} took {FOOD_WITH_ARTICLE[food]} to {r.choice(OUTSIDE_PLACES)}.")
        s.append(f"There, {p['he']} saw {friend.name} sitting alone. {_cap(fp['he'])} had nothing to eat "
                 f"and looked hungry.")
        s.append(f"{n} thought for a moment. Then {p['he']} gave half of {p['his']} {food} to {friend.name}.")
        s.append(f"\"Thank you!\" said {friend.name} with a big smile.")
        s.append("They ate together and talked and laughed.")
        s.append(r.choice([f"{n} learned that sharing makes everyone happy.",
                           f"From that day on, {n} and {friend.name} were good friends."]))

    def _plot_map(self, hero, s, details):
        r, p, n = self.rng, hero.pronouns, hero.name
        treasure = r.choice(TREASURES)
        s.append(f"One day, {n} found an old map {r.choice(MAP_PLACES)}.")
        s.append(f"On the map, there was a big red X. \"I wonder what is there,\" said {n}.")
        path = r.sample(["a little bridge", "a dark forest", "a field of flowers", "a tall hill",
                         "a quiet pond", "an old windmill"], 2)
        s.append(f"{_cap(p['he'])} followed the map past {path[0]} and over {path[1]}.")
        s.append(f"At the place of the red X, {n} found {treasure}.")
        s.append(f"\"Wow!\" said {n}. {_cap(p['he'])} was {r.choice(FEELINGS_HAPPY)}.")
        s.append(f"{n} ran home to tell {p['his']} {r.choice(FAMILY)} all about it.")

    def request(self) -> list:
        """A conversation: a user asks for something, the assistant answers."""
        r = self.rng
        if r.random() < 0.08:
            question = r.choice(sorted(GREETINGS))
            return [{"role": "user", "content": question}, {"role": "assistant", "content": GREETINGS[question]}]
        kind = r.choice(["girl", "boy"] + ANIMALS)
        hero = self.hero(kind=kind)
        plot = r.choice(PLOTS)
        details = {}
        form = r.randrange(6)
        if form == 0:
            hero, plot, ask = self.hero(), r.choice(PLOTS), "Tell me a story."
        elif form == 1:
            ask = r.choice([f"Tell me a story about {_a(kind)}.", f"I want a story about {_a(kind)}.",
                            f"Can you tell me a story about {_a(kind)}?"])
        elif form == 2:
            ask = r.choice([f"Tell me a story about {_a(kind)} named {hero.name}.",
                            f"Can you tell me a story about {_a(kind)} called {hero.name}?"])
        elif form == 3:
            ask = f"Please tell me a short story about {hero.name}."
        else:
            p = hero.pronouns
            if plot == "lost":
                details["toy"] = r.choice(TOYS)
            elif plot == "learn":
                details["skill"] = r.choice(SKILLS)
            elif plot == "share":
                details["food"] = r.choice(FOODS)
            hint = PLOT_REQUESTS[plot].format(toy=details.get("toy"), food=details.get("food"),
                                              skill=details.get("skill", ("",))[0].format(**p), **p)
            ask = r.choice([f"Write a story about {_a(kind)} {hint}.",
                            f"Tell me a story about {_a(kind)} {hint}."])
        story = self.story(hero=hero, plot=plot, details=details)
        return [{"role": "user", "content": ask}, {"role": "assistant", "content": story}]


    def conversation(self) -> list:
        """One or two exchanges, sometimes after a system message."""
        r = self.rng
        messages = self.request()
        if r.random() < 0.15:
            ask = r.choice(["Thank you!", "Tell me another story.",
                            f"Tell me another story about {_a(r.choice(['girl', 'boy'] + ANIMALS))}."])
            if ask == "Thank you!":
                answer = GREETINGS[ask]
            else:
                kind = ask.removesuffix(".").split(" ")[-1]
                answer = self.story(hero=self.hero(kind=None if kind == "story" else kind))
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        if r.random() < 0.1:
            messages.insert(0, {"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        return messages


def documents(n: int, seed: int, chat_fraction: float = 0.25):
    """Yield ``n`` documents: a story (str) or a conversation (list of messages)."""
    writer = StoryWriter(seed)
    for _ in range(n):
        if writer.rng.random() < chat_fraction:
            yield writer.conversation()
        else:
            yield writer.story()


if __name__ == "__main__":
    for doc in documents(6, seed=0, chat_fraction=0.5):
        print(doc, end="\n\n")
