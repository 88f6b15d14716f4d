"""Generate the small, synthetic demo corpus used by the C-BTM demo pipeline.

This script writes ``data/demo/corpus.jsonl`` (relative to this file's own
directory, so it works from any working directory). The corpus contains 420
short English documents, exactly 70 in each of six clearly distinct domains:
cooking, astronomy, football (soccer), law, programming and medicine. Every
line is a JSON object of the form::

    {"id": "<domain>-<nnn>", "text": "...", "domain": "<domain>"}

The ``domain`` field is only a ground-truth label for evaluating the
unsupervised clustering; the pipeline itself should look only at ``text``.

All sentences below are original text written for this project. Documents are
built by composition: each domain has a bank of sentences grouped by subtopic,
and each document samples 4-10 sentences (without repetition) mostly from one
or two subtopics so that it reads coherently. No two documents are identical,
and no two share more than half of their sentences (Jaccard overlap <= 0.5),
so documents are not near-copies of each other. Generation uses a fixed
``random.Random(SEED)``, so the output is byte-identical on every run.

Re-run with (stdlib only, Python 3.11+)::

    python data/make_demo.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 20240611
DOCS_PER_DOMAIN = 70
MIN_WORDS = 40
MAX_WORDS = 200
MIN_SENTENCES = 4
MAX_SENTENCES = 10
MIN_BANK_SIZE = 80
MAX_FROM_PRIMARY = 7  # longer documents must mix in a second subtopic
MAX_OVERLAP = 0.5  # max sentence-set Jaccard overlap between two documents

OUT_PATH = Path(__file__).resolve().parent / "demo" / "corpus.jsonl"

# ---------------------------------------------------------------------------
# Sentence banks: domain -> subtopic -> list of original sentences.
# ---------------------------------------------------------------------------

BANKS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "bread": [
            "Most bread dough should rise in a warm spot for one to two hours, or until it has roughly doubled in size.",
            "A kitchen around 24 to 27 degrees Celsius gives yeast dough a steady, even first rise.",
            "To check whether dough has proofed enough, press a floured finger into it; if the dent springs back slowly, it is ready for the oven.",
            "Dough that rises for too long can over-proof, collapse in the oven, and bake into a flat, sour loaf.",
            "A slow overnight rise in the refrigerator develops a deeper flavor in the bread and makes the baking schedule more flexible.",
            "Instant yeast can be mixed straight into the flour, while active dry yeast is usually bloomed in warm water first.",
            "Water hotter than about 45 degrees Celsius can kill the yeast and leave the dough dense and unrisen.",
            "Kneading stretches the gluten network so the dough can trap the gas released by the yeast.",
            "After shaping, a loaf usually needs a second, shorter proof of thirty to sixty minutes before baking.",
            "Covering the bowl with a damp towel or plastic wrap keeps the surface of the dough from drying into a skin.",
            "On a cold day, an oven with only the light switched on makes a surprisingly good proofing box for dough.",
            "Whole wheat dough tends to rise more slowly than dough made with white bread flour.",
            "A pinch of sugar feeds the yeast, but salt in direct contact with it will slow the rise.",
            "Scoring the top of a proofed loaf with a sharp blade lets the bread expand neatly as it bakes.",
        ],
        "sauces": [
            "A classic roux is made by cooking equal weights of butter and flour before whisking in warm milk or stock.",
            "Bechamel thickens as it simmers, so it should be stirred constantly to keep it from catching on the bottom of the pan.",
            "Reducing a pan sauce over high heat concentrates its flavor and gives it a glossy body.",
            "Whisking cold butter into a warm sauce at the end, off the heat, makes it silky without letting it split.",
            "Deglazing the pan with a splash of wine lifts the browned bits left behind after searing meat.",
            "A hollandaise can break if the melted butter is added too quickly or the bowl gets too hot.",
            "A spoonful of mustard helps a vinaigrette stay emulsified instead of separating into oil and vinegar.",
            "Tomato sauce gains sweetness and depth when it simmers slowly for an hour with a little olive oil and garlic.",
            "A cornstarch slurry thickens a sauce almost instantly, but it should be stirred into liquid that is already simmering.",
            "Taste a sauce for salt and acidity right before serving, since the flavors shift as it reduces.",
            "Mayonnaise is simply an emulsion of egg yolk and oil, built up by adding the oil a few drops at a time.",
            "A squeeze of lemon juice at the end can brighten a heavy cream sauce.",
        ],
        "knife_skills": [
            "A sharp chef's knife is safer than a dull one because it cuts cleanly instead of slipping off the food.",
            "Curling the fingertips of the guiding hand into a claw keeps them away from the blade while chopping.",
            "Cutting vegetables into pieces of the same size helps them cook evenly in the pan.",
            "A fine dice of onion, carrot, and celery forms the flavor base of many soups and braises.",
            "Honing the edge with a steel before each use keeps the blade aligned between proper sharpenings.",
            "A damp kitchen towel under the cutting board stops it from sliding across the counter.",
            "Julienne means cutting vegetables into thin matchsticks, often for salads or stir fries.",
            "Rocking the knife from tip to heel is the quickest way to mince fresh herbs and garlic.",
            "Wooden and plastic cutting boards are kinder to a knife edge than glass or stone surfaces.",
            "A chiffonade of basil is made by stacking the leaves, rolling them tightly, and slicing across the roll.",
            "Good kitchen knives should be washed by hand and dried right away rather than left to soak in the sink.",
        ],
        "roasting": [
            "Roasting vegetables at a high oven temperature, around 220 degrees Celsius, caramelizes their edges.",
            "Spreading the vegetables in a single layer on the baking tray lets them roast instead of steam.",
            "A whole roast chicken should rest for ten to fifteen minutes so the juices settle back into the meat.",
            "Patting meat dry before it goes into the oven helps the skin turn crisp and golden.",
            "A meat thermometer is the most reliable way to tell when a roast is cooked through.",
            "Poultry is safe to eat once the thickest part of the thigh reaches 74 degrees Celsius.",
            "Basting the roast with its own drippings adds flavor and color to the surface.",
            "Tossing parboiled potatoes in hot fat before roasting gives them a crunchy shell and a fluffy center.",
            "Root vegetables such as carrots and parsnips become sweet and tender after forty minutes in a hot oven.",
            "A rack in the roasting pan lets hot air circulate underneath the joint of meat.",
            "Searing a beef joint in a heavy pan before roasting builds a deep brown crust.",
            "The pan drippings left after roasting can be turned into a quick gravy with a little flour and stock.",
        ],
        "pastry_baking": [
            "Pastry dough stays flaky when the butter is kept cold and left in small visible pieces.",
            "Chilling pie dough for at least thirty minutes relaxes the gluten and keeps the crust from shrinking.",
            "Blind baking a tart shell with ceramic beans prevents a soggy bottom under a wet filling.",
            "Most cakes bake at around 180 degrees Celsius, and a skewer inserted in the center should come out clean.",
            "Creaming butter and sugar together traps tiny air bubbles that help a cake rise in the oven.",
            "Measuring flour by weight rather than by cups gives far more consistent baking results.",
            "Opening the oven door too early can cause a rising sponge cake to sink in the middle.",
            "Baking soda needs an acid such as buttermilk or yogurt to react, while baking powder carries its own acid.",
            "Puff pastry gets its hundreds of layers from folding a slab of butter into the dough again and again.",
            "Brushing pastry with beaten egg before baking gives it a shiny, deep golden finish.",
            "Cookies keep cooking for a minute on the hot tray, so they are pulled from the oven while the centers still look soft.",
            "An inexpensive oven thermometer often reveals that the dial is off by ten degrees or more.",
        ],
        "spices": [
            "Toasting whole spices in a dry pan for a minute releases their aromatic oils.",
            "Ground spices lose their strength within months, so it pays to buy them in small amounts.",
            "Cumin, coriander, and turmeric form the backbone of many curry powders.",
            "Blooming spices in hot oil at the start of a dish spreads their flavor through the whole pot.",
            "Smoked paprika adds a gentle smoky note to stews, beans, and roasted potatoes.",
            "A mortar and pestle crushes peppercorns and seeds more coarsely and fragrantly than an electric grinder.",
            "Cinnamon and nutmeg show up in both sweet baking and savory stews in many cuisines.",
            "Chili heat builds over time in a simmering dish, so it is wise to add chili gradually and taste often.",
            "Whole spices such as bay leaves and cardamom pods are usually fished out before the dish is served.",
            "Delicate fresh herbs like parsley and cilantro are best stirred in at the very end of cooking.",
            "Saffron threads are steeped in warm water to draw out their color before they go into the rice.",
        ],
        "fermentation": [
            "Sauerkraut is made by massaging salt into shredded cabbage and letting lactic acid bacteria do the rest.",
            "A sourdough starter is a living culture of wild yeast and bacteria that is fed regularly with flour and water.",
            "Fermenting vegetables should stay submerged under their brine to keep mold away.",
            "Kimchi ferments quickly at room temperature and much more slowly once it goes into the refrigerator.",
            "Homemade yogurt sets when warm milk is held at about 43 degrees Celsius with a spoonful of live culture.",
            "Bubbles and a pleasantly sour smell are good signs that a vegetable ferment is active.",
            "Weighing the salt as a percentage of the vegetables makes brine fermentation far more predictable.",
            "A sourdough starter is ready to bake with when it doubles in the jar within a few hours of feeding.",
            "Miso and soy sauce rely on a mold called koji to break down soybeans and grain.",
            "Glass jars with loose lids let fermentation gases escape without letting dust into the crock.",
            "Kombucha is brewed by fermenting sweetened tea with a rubbery culture of yeast and bacteria.",
        ],
        "stocks_soups": [
            "A good chicken stock starts with cold water and bones brought slowly up to a gentle simmer.",
            "Skimming the foam from the surface of a simmering stock keeps the broth clear.",
            "Boiling a stock hard makes it cloudy and greasy, so the heat should stay low.",
            "Onion, carrot, celery, peppercorns, and a bay leaf are the usual aromatics for a stock pot.",
            "Roasting beef bones in the oven first gives a brown stock its rich color and flavor.",
            "Vegetable stock needs only about forty minutes of simmering before the vegetables start to taste bitter.",
            "A cooled stock that sets into a wobbly jelly is full of gelatin from the bones.",
            "Soups are often finished with a drizzle of cream, a spoonful of pesto, or a handful of croutons.",
            "Pureeing part of a bean soup and stirring it back into the pot thickens it without any flour.",
            "Homemade stock can be frozen in small portions and used to enrich sauces, risotto, and braises.",
        ],
    },
    "astronomy": {
        "planets": [
            "Jupiter is the largest planet in the solar system, a gas giant more than eleven times wider than Earth.",
            "Saturn's rings are made of countless chunks of ice and rock, ranging from dust grains to boulders.",
            "Mars appears red because iron minerals in its dusty surface have rusted over billions of years.",
            "Venus has a thick carbon dioxide atmosphere that traps heat, making its surface hotter than Mercury's.",
            "Mercury, the innermost planet, swings between scorching days and freezing nights because it has almost no atmosphere.",
            "Uranus rotates on its side, probably because of a giant collision early in the history of the solar system.",
            "Neptune was predicted by mathematics before it was seen, after astronomers noticed small wobbles in the orbit of Uranus.",
            "The Great Red Spot on Jupiter is a storm larger than Earth that has raged for centuries.",
            "Several moons of Jupiter and Saturn, such as Europa and Enceladus, may hide liquid oceans beneath their icy crusts.",
            "Pluto was reclassified as a dwarf planet because it has not cleared its orbital neighborhood of other bodies.",
            "The rocky inner planets formed closer to the Sun, where it was too warm for ices to condense.",
            "Thousands of exoplanets have now been found around other stars, many of them detected as they pass in front of their host star.",
        ],
        "telescopes": [
            "A refracting telescope gathers light with a lens, while a reflecting telescope uses a curved mirror.",
            "The aperture of a telescope, the diameter of its main lens or mirror, determines how much faint starlight it can collect.",
            "Space telescopes orbit above the atmosphere, so their images are not blurred by turbulent air.",
            "Radio telescopes use huge dish antennas to detect long wavelength emission from gas clouds and distant galaxies.",
            "Adaptive optics systems bend a flexible mirror hundreds of times a second to cancel out atmospheric twinkling.",
            "Infrared telescopes can peer through dusty clouds to reveal stars that are still forming.",
            "For a telescope, magnification matters less than aperture, since a blurry image simply gets larger at higher power.",
            "Large observatories are built on high, dry mountains where the sky is dark and the air is steady.",
            "An equatorial mount lets a telescope follow a star across the sky by turning around a single axis.",
            "A spectrograph splits starlight into its colors, revealing the chemical elements in a star's atmosphere.",
            "Linking radio dishes across continents creates a virtual telescope as wide as the Earth itself.",
            "Amateur astronomers often start with binoculars, which already show lunar craters and the four largest moons of Jupiter.",
        ],
        "galaxies": [
            "The Milky Way is a barred spiral galaxy containing a few hundred billion stars.",
            "Our Sun lies in one of the spiral arms, roughly twenty six thousand light years from the galactic center.",
            "A supermassive black hole sits at the center of the Milky Way, weighing about four million times the mass of the Sun.",
            "Elliptical galaxies are smooth, rounded systems dominated by old, reddish stars.",
            "The Andromeda galaxy is the nearest large spiral and is on course to merge with the Milky Way in a few billion years.",
            "Galaxies gather into groups and clusters held together by gravity and vast amounts of dark matter.",
            "The rotation speeds of spiral galaxies suggest they contain far more mass than their visible stars account for.",
            "Light from the most distant galaxies has traveled for more than thirteen billion years to reach our telescopes.",
            "The redshift of a galaxy's spectrum shows how fast it is receding from us as the universe expands.",
            "Colliding galaxies can trigger bursts of star formation as their gas clouds are compressed.",
            "Quasars are extremely bright galactic cores powered by gas spiraling into enormous black holes.",
            "The Large and Small Magellanic Clouds are dwarf galaxies that orbit the Milky Way and are visible from the southern hemisphere.",
        ],
        "stellar_life": [
            "Stars are born inside cold clouds of gas and dust that collapse under their own gravity.",
            "A star spends most of its life on the main sequence, fusing hydrogen into helium in its core.",
            "The Sun is a middle-aged yellow dwarf, about four and a half billion years into a ten billion year lifetime.",
            "When a star like the Sun runs low on hydrogen in its core, it swells into a red giant.",
            "The outer layers of a dying Sun-like star drift away, leaving behind a hot, dense white dwarf.",
            "Massive stars burn through their nuclear fuel quickly and end their lives in brilliant supernova explosions.",
            "The collapsed stellar core left after a supernova can become a neutron star only a few kilometers across.",
            "If the remaining stellar core is heavy enough, nothing can halt its collapse and it forms a black hole.",
            "Heavy elements such as iron, gold, and uranium were forged in stars and scattered by stellar explosions.",
            "A star's color reveals its surface temperature, with blue stars the hottest and red stars the coolest.",
            "Red dwarfs are so small and frugal with their fuel that they may shine for trillions of years.",
            "Pulsars are rapidly spinning neutron stars that sweep beams of radio waves across space like a lighthouse.",
        ],
        "eclipses": [
            "A solar eclipse happens when the Moon passes directly between the Earth and the Sun.",
            "During a total solar eclipse, the Sun's faint outer atmosphere, the corona, becomes visible around the dark Moon.",
            "A lunar eclipse occurs when the Earth's shadow falls across the full Moon.",
            "The Moon often turns a coppery red during a total lunar eclipse because sunlight is bent through Earth's atmosphere.",
            "Looking at a partial solar eclipse without certified eclipse glasses can permanently damage the eyes.",
            "A total solar eclipse is visible only from a narrow path on the Earth's surface where the Moon's darkest shadow falls.",
            "An annular eclipse leaves a bright ring of sunlight because the Moon is too far away to cover the whole solar disk.",
            "Eclipses do not happen every month because the Moon's orbit is tilted about five degrees relative to Earth's orbit.",
            "Similar eclipses repeat in a cycle of about eighteen years known as the saros.",
            "During totality the sky darkens enough that bright planets and stars appear in the daytime.",
            "A famous eclipse expedition in 1919 measured starlight bending around the Sun, supporting general relativity.",
        ],
        "orbits": [
            "Planets move in elliptical orbits with the Sun at one focus, as Kepler described four centuries ago.",
            "A planet moves fastest when it is closest to the Sun and slowest when it is farthest away.",
            "Earth takes about 365.25 days to complete one orbit, which is why calendars add a leap day.",
            "Satellites in geostationary orbit circle the Earth once a day and appear to hover over one spot.",
            "The Moon is tidally locked, so it always shows the same face toward the Earth.",
            "Comets follow long, stretched orbits that carry them from the cold outer solar system to close passes by the Sun.",
            "Newton showed that the same gravity that pulls an apple to the ground keeps the Moon in its orbit.",
            "Spacecraft use gravity assists, swinging past planets to gain speed on their way to the outer solar system.",
            "The asteroid belt between Mars and Jupiter contains millions of rocky bodies on roughly circular orbits.",
            "The seasons are caused by the tilt of Earth's axis, not by changes in its distance from the Sun.",
            "Lagrange points are places where the gravity of two large bodies balances, letting a spacecraft hold its position.",
            "Ocean tides on Earth are raised mainly by the Moon's gravitational pull.",
        ],
        "nebulae": [
            "A nebula is a vast cloud of interstellar gas and dust, often glowing or silhouetted against brighter regions.",
            "Emission nebulae shine red because their hydrogen gas is energized by the ultraviolet light of nearby young stars.",
            "The Orion Nebula is a nearby stellar nursery visible to the naked eye as a fuzzy patch in Orion's sword.",
            "Dark nebulae are dense dust clouds that block the light of the stars behind them.",
            "Planetary nebulae have nothing to do with planets; they are glowing shells of gas shed by dying stars.",
            "Reflection nebulae appear blue because their dust scatters the light of nearby stars.",
            "The Crab Nebula is the expanding wreckage of a supernova recorded by sky watchers in the year 1054.",
            "Pillars of cold gas inside star-forming nebulae are slowly eroded by radiation from newborn stars.",
            "Long exposure photographs reveal colors in nebulae that the human eye cannot see through a telescope eyepiece.",
            "Narrowband filters isolate the light of hydrogen, oxygen, and sulfur to map the structure of a nebula.",
            "Supernova remnants enrich nebulae with heavy elements that later end up in new stars and planets.",
        ],
        "observing": [
            "Light pollution from cities washes out faint stars, so stargazers travel to dark sky sites.",
            "It takes about twenty minutes for the eyes to fully adapt to darkness under a night sky.",
            "A red flashlight preserves night vision while an observer reads a star chart.",
            "Meteor showers occur when Earth passes through the trail of debris left behind by a comet.",
            "The Perseid meteor shower peaks every August and can produce dozens of meteors per hour.",
            "Constellations are patterns of stars that appear close together but usually lie at very different distances.",
            "Planets shine with a steady light, while stars twinkle as their light passes through the atmosphere.",
            "The North Star, Polaris, stays nearly fixed in the sky because it lies close to Earth's rotation axis.",
            "Astrophotographers stack many short exposures to reduce noise and reveal faint detail in galaxies.",
            "The phases of the Moon follow a cycle of about twenty nine and a half days.",
            "Star-hopping from bright stars to faint targets is a classic way to find deep sky objects without a computerized mount.",
        ],
    },
    "football": {
        "tactics": [
            "A 4-3-3 formation uses three forwards, with the wingers stretching the opposition defense across the pitch.",
            "Coaches who favor a back three often push their wing-backs high up the pitch to support the attack.",
            "A compact defensive block denies space between the lines and forces the opponent to play wide.",
            "Possession-based teams circulate the ball patiently, waiting for a gap to open in the opponent's midfield.",
            "A holding midfielder screens the back four and recycles possession with short, simple passes.",
            "Counterattacking sides sit deep and then break forward quickly the moment they win the ball.",
            "Overloading one flank can drag defenders across and leave a teammate unmarked on the far side of the pitch.",
            "Managers often switch formation at half time when their midfield is being outnumbered.",
            "Inverted full-backs step into midfield when their team has the ball, giving the playmaker an extra passing option.",
            "A false nine drops away from the center-backs to pull them out of position and create space for runners.",
            "Playing out from the back requires center-backs who stay calm on the ball under pressure.",
            "A two-striker system can pin both center-backs and give the team a constant presence in the penalty area.",
        ],
        "goalkeepers": [
            "A goalkeeper must narrow the angle by advancing off the line when a striker breaks through alone.",
            "Modern goalkeepers are expected to be comfortable with the ball at their feet and to start attacks with accurate passes.",
            "Commanding the penalty area means a keeper comes off the line confidently to claim high crosses.",
            "Penalty saves often come from studying a taker's habits in the days before the match.",
            "A sweeper keeper stays high behind the defense to clear long balls played over the back line.",
            "The goalkeeper is the only player allowed to handle the ball, and only inside their own penalty area.",
            "Keepers organize the defensive wall at free kicks, shouting instructions over the noise of the crowd.",
            "A clean sheet is credited to the goalkeeper and the back four when the team concedes no goals in a match.",
            "Reflex saves at close range are trained with rapid-fire shooting drills from just a few yards out.",
            "A goalkeeper who spills a shot back into the six-yard box gives the attackers an easy rebound.",
            "Distribution from the keeper, whether a quick throw or a long goal kick, can launch a counterattack in seconds.",
        ],
        "offside_refereeing": [
            "A player is in an offside position if they are nearer to the goal line than both the ball and the second-last defender when the ball is played.",
            "It is not an offence to stand in an offside position unless the attacker becomes involved in active play.",
            "A player cannot be caught offside directly from a throw-in, a goal kick, or a corner kick.",
            "The video assistant referee reviews goals, penalty decisions, straight red cards, and cases of mistaken identity.",
            "Assistant referees patrol the touchline and raise a flag to signal offside or that the ball has left the pitch.",
            "A yellow card is a caution, and two yellow cards in the same match mean the player is sent off.",
            "Defenders sometimes step up together to catch attackers offside, but a mistimed step leaves the goal exposed.",
            "Semi-automated offside technology tracks the players' limbs to draw the offside line within a few centimeters.",
            "The referee may play advantage and let the game flow when stopping for a foul would help the offending team.",
            "A handball is penalized when a player deliberately touches the ball with the arm or makes their body unnaturally bigger.",
            "Fouls committed inside the penalty area by the defending team result in a penalty kick.",
            "Stoppage time is added at the end of each half to make up for substitutions and other delays.",
        ],
        "transfers": [
            "The summer transfer window is the busiest time of year for clubs to buy and sell players.",
            "A release clause lets another club sign a player automatically by paying a fixed, agreed fee.",
            "Clubs often loan young players to lower-division sides so they can gain first-team minutes.",
            "Transfer fees for star forwards have climbed to well over one hundred million euros.",
            "A player entering the final year of his deal can leave on a free transfer at the end of the season, which weakens the selling club.",
            "Scouts watch hundreds of matches to find undervalued players in smaller leagues.",
            "Sell-on clauses give a former club a percentage of the fee if the player is transferred again.",
            "Deadline day brings a rush of last-minute signings before the transfer window slams shut.",
            "Agents negotiate wages, signing bonuses, and image rights on behalf of the footballers they represent.",
            "A new signing usually has to complete a medical before the club unveils him to the supporters.",
            "Financial fair play rules limit how much clubs can spend on transfers compared with the revenue they earn.",
            "Swap deals let two clubs exchange players, sometimes with a cash payment to balance the valuations.",
        ],
        "leagues": [
            "In most European leagues, every team plays each opponent twice, once at home and once away.",
            "A win earns three points in the league table, a draw one point, and a defeat none.",
            "The bottom clubs in the table are relegated to the second division at the end of the season.",
            "The Champions League brings together the top clubs from across Europe in a league phase and knockout rounds.",
            "The World Cup is held every four years and is the most watched sporting event on the planet.",
            "Goal difference separates teams that finish level on points in the league table.",
            "Domestic cup competitions let amateur and lower-league sides dream of a giant-killing upset.",
            "Promotion playoffs decide the final team to move up, often in a tense one-off match at a neutral stadium.",
            "Away goals once counted double in European ties, but the rule has since been abolished.",
            "A title race can come down to the final matchday, with two clubs kicking off at the same time.",
            "Continental championships such as the Copa America and the European Championship crown the best national team in each region.",
            "Winning the league, the domestic cup, and the Champions League in one season is known as the treble.",
        ],
        "pressing": [
            "High pressing teams try to win the ball back within seconds of losing it, close to the opponent's goal.",
            "The counterpress works best when players stay close together, so several of them can swarm the ball carrier.",
            "Pressing triggers, such as a loose touch or a pass back to the goalkeeper, tell the forwards when to charge.",
            "A well-organized press funnels the opponent toward the touchline, where the sideline acts as an extra defender.",
            "Pressing high leaves space behind the defense, so the back line must push up and stay compact.",
            "Forwards in a pressing system curve their runs to cut off passing lanes to the center-backs.",
            "Teams that press relentlessly need exceptional stamina and often rotate their squad during a busy fixture list.",
            "A midfield press aims to intercept passes into the central area rather than chasing the ball all over the pitch.",
            "Tactical fouls are sometimes used to stop a counterattack when the press has been bypassed.",
            "Breaking a high press requires quick passing, movement off the ball, and midfielders willing to receive under pressure.",
            "Analysts measure pressing intensity by counting how many passes an opponent completes before each defensive action.",
        ],
        "set_pieces": [
            "Corner kicks are a rich source of goals for teams with tall center-backs who attack the ball in the air.",
            "A free kick within thirty yards of goal gives a skilled taker the chance to curl the ball over the wall.",
            "Set-piece coaches design rehearsed routines with decoy runs and blocks to free a header in the box.",
            "Penalty takers must decide whether to pick a corner of the net or wait for the goalkeeper to dive first.",
            "Zonal marking assigns defenders to areas of the six-yard box rather than to individual opponents.",
            "Long throw-ins can act like corner kicks when a player is able to hurl the ball into the goalmouth.",
            "An indirect free kick cannot be scored directly and must touch another player first.",
            "Short corners pull defenders out of the penalty area and create a better angle for the cross.",
            "The defensive wall must stand at least ten yards from the ball when a free kick is taken.",
            "A penalty shootout decides knockout matches that remain level after extra time.",
            "Near-post flick-ons at corners can redirect the ball to an unmarked striker at the back post.",
        ],
        "attacking": [
            "A natural striker instinctively finds space in the penalty area and finishes with the first touch.",
            "Wingers who cut inside onto their stronger foot can shoot across the goalkeeper toward the far post.",
            "A through ball split between two defenders can release a forward clean through on goal.",
            "The number ten plays in the pocket between midfield and defense, creating chances with clever passes.",
            "Expected goals measures the quality of the chances a team creates, not just how many shots it takes.",
            "A hat-trick is scored when one player finds the net three times in a single match.",
            "Overlapping runs from the full-back give the winger an option to pass or to dribble inside.",
            "Target men hold the ball up with their back to goal and bring the midfielders into the attack.",
            "A cutback from the byline to the edge of the six-yard box is one of the most dangerous passes in football.",
            "One-touch passing combinations around the box can pull a defense apart in a few seconds.",
            "The golden boot is awarded to the leading goalscorer in a league or tournament.",
        ],
    },
    "law": {
        "contracts": [
            "A valid contract generally requires an offer, an acceptance, consideration, and an intention to create legal relations.",
            "Consideration is something of value that each party gives in exchange for the other party's promise.",
            "A counteroffer rejects the original offer and replaces it with new contractual terms.",
            "When one party fails to perform its obligations, the other party may sue for breach of contract.",
            "Damages for breach of contract aim to put the injured party where it would have been had the contract been performed.",
            "A contract signed under duress or undue influence may be set aside by the court.",
            "Exclusion clauses that try to limit liability are construed narrowly against the party relying on them.",
            "Some contracts, such as those for the sale of land, must be in writing to be enforceable.",
            "A misrepresentation that induced a party to sign can give grounds to rescind the agreement.",
            "Courts may imply terms into a contract where they are necessary to give it business efficacy.",
            "Specific performance is an equitable remedy ordering a party to carry out its contractual obligations.",
            "A minor usually lacks full legal capacity to enter binding contracts, except for necessaries.",
        ],
        "civil_procedure": [
            "Civil proceedings begin when the claimant files a complaint and serves it on the defendant.",
            "A court must have jurisdiction over both the subject matter and the parties before it can decide a case.",
            "During discovery, each side may request documents and take depositions from the opposing party's witnesses.",
            "A motion for summary judgment asks the court to decide the case without a trial because no genuine factual dispute exists.",
            "The burden of proof in civil litigation is usually the balance of probabilities.",
            "Judges manage the litigation timetable and may impose sanctions on parties who ignore procedural orders.",
            "Many civil disputes settle before trial, often after mediation with a neutral third party.",
            "Small claims courts offer a simplified procedure for low-value disputes without the need for an attorney.",
            "A default judgment may be entered when the defendant fails to respond to the complaint in time.",
            "Limitation periods set strict deadlines for bringing a claim, after which the action is time-barred.",
            "The pleadings define the issues in dispute and limit what the litigants may argue at trial.",
        ],
        "appeals": [
            "An appellant must usually show that the trial court made an error of law, not merely that the verdict was disappointing.",
            "Appellate courts rarely disturb findings of fact because the trial judge heard the witnesses in person.",
            "A notice of appeal must be filed within a strict deadline after the judgment is entered.",
            "The appellate court may affirm, reverse, or remand the case to the lower court for a new hearing.",
            "Written briefs set out each side's legal arguments before the appeal is heard.",
            "Oral argument gives appellate judges the chance to question counsel about weak points in the brief.",
            "A dissenting opinion explains why one judge disagrees with the majority's legal reasoning.",
            "In many legal systems, permission to appeal to the highest court is granted only for questions of general public importance.",
            "A stay of execution may pause enforcement of the judgment while the appeal is pending.",
            "Appeals in criminal cases may challenge the conviction, the sentence, or both.",
            "The standard of review determines how much deference the appellate court gives to the decision below.",
        ],
        "tort": [
            "The tort of negligence requires a duty of care, a breach of that duty, causation, and resulting damage.",
            "The reasonable person standard asks how an ordinary, prudent individual would have behaved in the same situation.",
            "Occupiers owe a legal duty to lawful visitors to keep their premises reasonably safe.",
            "Defamation law protects a person's reputation against false statements published to third parties.",
            "Contributory negligence can reduce the damages awarded when the claimant was partly at fault.",
            "Strict liability imposes responsibility for certain hazardous activities even without proof of fault.",
            "An employer may be vicariously liable for torts committed by employees in the course of their employment.",
            "Nuisance claims arise when a neighbor's activities unreasonably interfere with the use and enjoyment of land.",
            "The harm must not be too remote in law; it must be a reasonably foreseeable consequence of the breach of duty.",
            "Product liability law allows consumers harmed by defective goods to sue the manufacturer.",
            "Trespass to land occurs when someone enters another's property without permission or lawful justification.",
            "Punitive damages are occasionally awarded to punish especially outrageous conduct by the defendant.",
        ],
        "evidence": [
            "Hearsay is an out-of-court statement offered to prove the truth of what it asserts, and it is often inadmissible.",
            "Evidence must be relevant, meaning it makes a fact in issue more or less probable.",
            "Privileged communications between a client and a lawyer cannot normally be disclosed in court.",
            "Expert witnesses may give opinions on technical matters that lie beyond the ordinary knowledge of the jury.",
            "Cross-examination tests the credibility of a witness and exposes inconsistencies in the testimony.",
            "Evidence obtained through an unlawful search may be excluded from a criminal trial.",
            "A chain of custody record shows that physical evidence was not tampered with after it was seized.",
            "Leading questions, which suggest the answer, are generally not allowed during direct examination of a witness.",
            "Documentary evidence must usually be authenticated before it is admitted into the record.",
            "The judge rules on objections to evidence, sustaining or overruling them as the trial proceeds.",
            "Character evidence is restricted because it may tempt the jury to convict for who the defendant is rather than what he did.",
        ],
        "statutes": [
            "A statute is a written law enacted by the legislature, and it overrides inconsistent common law rules.",
            "Courts interpret statutes by looking first at the plain meaning of the words the legislature chose.",
            "The purposive approach reads a statutory provision in light of the mischief it was enacted to remedy.",
            "Delegated legislation, such as regulations, is made by ministers or agencies under powers granted by a parent act.",
            "A bill becomes law only after it passes through the legislature and receives final assent or signature.",
            "Sunset clauses cause a statutory provision to expire automatically unless the legislature renews it.",
            "Courts can strike down regulations that exceed the authority granted by the enabling statute.",
            "A definitions section at the start of an act fixes the meaning of key terms used throughout the legislation.",
            "Penal statutes are construed strictly, so genuine ambiguity is resolved in favor of the accused.",
            "Consolidation acts gather scattered statutory provisions on one subject into a single statute.",
            "Legislation generally does not apply retrospectively unless the statute clearly says so.",
        ],
        "criminal_trials": [
            "In criminal cases the prosecution must prove guilt beyond a reasonable doubt.",
            "Prospective jurors are drawn from the community and questioned to screen out bias before the trial begins.",
            "The judge instructs the jury on the law, while the jury decides the facts.",
            "Jury deliberations are secret, and jurors may not discuss the case with outsiders.",
            "A hung jury that cannot reach a verdict may lead to a retrial.",
            "The presumption of innocence means the defendant does not have to prove anything at trial.",
            "A criminal defendant has the right to remain silent and to be represented by counsel.",
            "Sentencing follows a guilty verdict and takes into account aggravating and mitigating factors.",
            "Plea bargaining allows a defendant to plead guilty to a lesser charge in exchange for a lighter sentence.",
            "In some jurisdictions a grand jury decides whether there is enough evidence to indict a suspect.",
            "Closing speeches by prosecution and defense counsel summarize the evidence and urge the jury toward a verdict.",
            "Double jeopardy protections prevent a person from being tried twice for the same offence after an acquittal.",
        ],
        "precedent": [
            "Under the doctrine of stare decisis, lower courts are bound to follow the decisions of higher courts.",
            "The ratio decidendi is the legal reasoning essential to a decision, and it is the part that binds later courts.",
            "Obiter dicta are remarks made in passing by a judge and are persuasive rather than binding.",
            "A court may distinguish an earlier case when its material facts differ from the dispute at hand.",
            "Higher courts can overrule their own earlier precedents when the reasoning has become outdated.",
            "Common law systems develop legal rules incrementally through the accumulated judgments of the courts.",
            "Judgments from other jurisdictions may be cited as persuasive authority when no binding case exists.",
            "Law reports publish important judgments so that lawyers can cite them in later litigation.",
            "A landmark ruling can reshape an entire area of law, such as the modern duty of care in negligence.",
            "Judges reason by analogy, comparing the facts before them with those of previously decided cases.",
            "Legal research involves tracing how a precedent has been applied, followed, or criticized since it was decided.",
        ],
    },
    "programming": {
        "compilers": [
            "A compiler translates source code into machine code or bytecode before the program runs.",
            "The lexer breaks source text into tokens such as identifiers, keywords, and operators.",
            "A parser builds an abstract syntax tree that represents the grammatical structure of the program.",
            "Static type checking catches errors like passing a string where an integer was expected before the code ever runs.",
            "Optimization passes remove dead code, inline small functions, and fold constant expressions.",
            "An interpreter executes code directly, while a just-in-time compiler translates hot paths into native code at runtime.",
            "An intermediate representation lets one compiler frontend target many different processor architectures.",
            "Register allocation decides which variables live in fast CPU registers and which spill to memory.",
            "The linker combines compiled object files and libraries into a single executable binary.",
            "Compiler warnings about unused variables or implicit conversions often point at real bugs.",
            "Incremental compilation rebuilds only the modules whose source files have changed.",
        ],
        "functions": [
            "A function should do one thing well and have a name that describes what it returns or does.",
            "Pure functions return the same output for the same input and have no side effects.",
            "Default arguments let callers omit parameters that usually take the same value.",
            "Recursion solves a problem by having a function call itself on a smaller version of the input.",
            "Every recursive function needs a base case, or it will eventually overflow the call stack.",
            "Higher-order functions accept other functions as arguments, as map and filter do.",
            "A closure captures variables from the lexical scope in which the function was defined.",
            "Keeping functions short makes them easier to read, test, and reuse across the codebase.",
            "Type annotations on function parameters document the expected inputs and help static analysis tools.",
            "Returning early from a function on invalid input avoids deeply nested conditional blocks.",
            "Lambda expressions define small anonymous functions inline, often as sort keys or callbacks.",
            "Using a mutable list as a default argument in Python is a classic bug because the same list is shared between calls.",
        ],
        "debugging": [
            "A stack trace shows the chain of function calls that led to an exception.",
            "Setting a breakpoint in the debugger pauses execution so you can inspect the values of variables.",
            "Reproducing a bug reliably is the first step toward fixing it.",
            "Adding log statements around the failing code often reveals which assumption is wrong.",
            "An off-by-one error occurs when a loop runs one iteration too many or too few.",
            "Null pointer exceptions happen when code dereferences a reference that was never initialized.",
            "Bisecting the commit history can pinpoint the exact change that introduced a regression.",
            "Explaining the code line by line to a colleague, or to a rubber duck, often exposes the bug.",
            "Memory leaks build up when allocated objects are never freed or remain reachable by accident.",
            "A profiler measures where a program spends its time, which is essential before optimizing anything.",
            "Heisenbugs seem to vanish when you attach a debugger because the timing of the program changes.",
            "Reading the error message carefully, including the file name and line number, solves a surprising number of bugs.",
        ],
        "version_control": [
            "Git records the history of a project as a series of commits, each one a snapshot of the source tree.",
            "Feature branches let developers work on changes in isolation before merging them into the main branch.",
            "A merge conflict arises when two branches edit the same lines of a file in different ways.",
            "Commit messages should explain why a change was made, not only what was changed in the code.",
            "Rebasing rewrites a branch so that its commits appear on top of the latest main branch.",
            "Pull requests give teammates a chance to review code and leave comments before it is merged.",
            "Tags mark specific commits, such as release versions, so they are easy to check out later.",
            "A gitignore file keeps build artifacts and local configuration out of the repository.",
            "Small, focused commits are easier to review and to revert if something breaks.",
            "Cloning a repository copies its entire commit history to the developer's machine.",
            "Continuous integration servers build and test every commit pushed to a shared branch.",
        ],
        "testing": [
            "Unit tests check small pieces of code, such as a single function, in isolation.",
            "Integration tests verify that several modules work together correctly, often against a real database.",
            "Test-driven development starts by writing a failing test and then writing just enough code to make it pass.",
            "Mocks and stubs replace slow or external dependencies so the tests run quickly and predictably.",
            "A flaky test passes or fails at random, often because of timing issues or shared global state.",
            "Code coverage reports show which lines were executed by the test suite, but high coverage does not guarantee correctness.",
            "Regression tests make sure that a fixed bug does not quietly return in a later release.",
            "Property-based testing generates many random inputs to check that an invariant always holds.",
            "Assertions in a unit test should state the expected result clearly so failures are easy to understand.",
            "Test fixtures set up the data and environment that each test needs and tear them down afterward.",
            "A fast test suite encourages developers to run it after every small change to the code.",
        ],
        "data_structures": [
            "Arrays store elements in contiguous memory, which makes indexing by position very fast.",
            "A hash map offers average constant time lookups by computing a hash of each key.",
            "Linked lists make insertion cheap but require walking the nodes to reach an element by index.",
            "A stack follows last-in, first-out order, while a queue follows first-in, first-out order.",
            "Binary search trees keep keys sorted so lookups take logarithmic time when the tree is balanced.",
            "A binary heap always keeps the smallest or largest element at the top, which makes it ideal for priority queues.",
            "Graphs model networks of nodes and edges and can be stored as adjacency lists or adjacency matrices.",
            "Choosing the right data structure often matters more for performance than micro-optimizing loops.",
            "Big O notation describes how the running time of an algorithm grows with the size of the input.",
            "A trie stores strings character by character and makes prefix searches efficient.",
            "Dynamic arrays double their capacity when full, so appending an element is cheap on average.",
            "Sets discard duplicate values automatically and answer membership queries quickly.",
        ],
        "concurrency": [
            "A race condition occurs when the result of a program depends on the unpredictable ordering of threads.",
            "A mutex protects shared data by allowing only one thread at a time into a critical section.",
            "A deadlock happens when two threads each hold a lock the other one needs.",
            "Async functions let a single thread juggle many network requests while waiting on input and output.",
            "Thread pools reuse a fixed number of worker threads instead of spawning a new thread for each task.",
            "Immutable data structures can be shared between threads safely because no thread can modify them.",
            "Message passing between processes avoids many of the pitfalls of shared memory.",
            "Atomic operations update a value in a single step that other threads cannot interrupt.",
            "In CPython, the global interpreter lock prevents threads from executing Python bytecode in parallel.",
            "Parallel programs split a large computation across multiple CPU cores to finish sooner.",
            "An event loop schedules callbacks and coroutines as their sockets and files become ready.",
        ],
        "databases_apis": [
            "A SQL query selects rows from tables and filters them with a WHERE clause.",
            "Database indexes speed up lookups on frequently queried columns at the cost of slower writes.",
            "Transactions group several database writes so they either all commit or all roll back.",
            "A REST API exposes resources at URLs and uses HTTP methods such as GET and POST.",
            "JSON is a lightweight text format widely used to exchange data between a server and a client.",
            "Parameterized queries protect an application from SQL injection attacks.",
            "An ORM maps database tables to classes so developers can work with objects instead of raw SQL.",
            "Versioning an API lets old clients keep working while new endpoints are introduced.",
            "Rate limiting protects a web service from being overwhelmed by too many requests.",
            "Normalizing a database schema reduces duplicated data across tables.",
            "Caching frequent query results in memory can cut the response time of an endpoint dramatically.",
        ],
    },
    "medicine": {
        "diagnosis": [
            "A diagnosis begins with a careful history, asking the patient when the symptoms started and what makes them better or worse.",
            "The physical examination includes listening to the heart and lungs with a stethoscope.",
            "Blood tests can reveal anemia, infection, or problems with kidney and liver function.",
            "A differential diagnosis lists the conditions that could explain the patient's symptoms, from most to least likely.",
            "X-rays are useful for spotting fractures and pneumonia, while MRI scans give detailed images of soft tissue.",
            "An electrocardiogram records the electrical activity of the heart and can detect arrhythmias.",
            "Biopsy samples are examined under a microscope to determine whether a tumor is benign or malignant.",
            "Screening programs aim to detect diseases such as breast and colon cancer before symptoms appear.",
            "Ultrasound uses sound waves to image organs and to monitor a pregnancy without radiation.",
            "Clinicians weigh the sensitivity and specificity of a diagnostic test when interpreting its result.",
            "A second medical opinion can be valuable when a diagnosis is uncertain or the proposed treatment carries serious risks.",
        ],
        "symptoms": [
            "A fever is usually a sign that the immune system is fighting an infection.",
            "Chest pain that spreads to the arm or jaw can be a warning sign of a heart attack and needs urgent care.",
            "Persistent headaches accompanied by changes in vision should be assessed by a doctor.",
            "Shortness of breath may point to asthma, heart failure, or a blood clot in the lungs.",
            "Unexplained weight loss and night sweats are symptoms that warrant further clinical investigation.",
            "Nausea, vomiting, and diarrhea often accompany viral gastroenteritis and can quickly lead to dehydration.",
            "Sudden weakness on one side of the face or body is a classic symptom of stroke.",
            "A persistent cough lasting more than three weeks should be checked by a doctor, especially in smokers.",
            "Fatigue is a common but nonspecific symptom that can stem from anemia, thyroid disease, or depression.",
            "Patients often rate their pain on a scale from zero to ten to help clinicians track changes.",
            "A rash with fever and a stiff neck may indicate meningitis, which is a medical emergency.",
        ],
        "vaccines": [
            "Vaccines train the immune system to recognize a pathogen without causing the disease itself.",
            "Many vaccines require a booster dose to maintain immunity over the years.",
            "Herd immunity protects vulnerable patients when a large share of the population is vaccinated.",
            "Common side effects of vaccination include a sore arm, mild fever, and tiredness for a day or two.",
            "mRNA vaccines deliver instructions that let cells make a harmless viral protein, prompting an immune response.",
            "The measles vaccine has prevented millions of deaths since it was introduced.",
            "Seasonal influenza vaccines are updated every year to match the virus strains expected to circulate.",
            "Live attenuated vaccines use a weakened form of the virus and are usually avoided in immunocompromised patients.",
            "Childhood immunization schedules protect against diseases such as polio, diphtheria, and whooping cough.",
            "Vaccine trials test safety and efficacy in thousands of volunteers before regulatory approval.",
            "Some vaccines must be kept refrigerated, so maintaining the cold chain is essential in remote clinics.",
        ],
        "blood_pressure": [
            "Blood pressure is recorded as two numbers, the systolic pressure over the diastolic pressure.",
            "A reading consistently above 140 over 90 millimeters of mercury is commonly classed as hypertension.",
            "High blood pressure often causes no symptoms, which is why it is sometimes called a silent killer.",
            "Reducing salt intake, exercising regularly, and limiting alcohol can lower blood pressure.",
            "ACE inhibitors and calcium channel blockers are widely prescribed antihypertensive drugs.",
            "Untreated hypertension raises the risk of stroke, heart attack, and kidney disease.",
            "Home blood pressure monitors help patients track their readings between clinic visits.",
            "White coat hypertension describes blood pressure readings that rise only in the clinic because of anxiety.",
            "Cholesterol builds up in artery walls as plaque, narrowing the coronary arteries that supply the heart.",
            "Statins lower LDL cholesterol and reduce the risk of cardiovascular events.",
            "Low blood pressure can cause dizziness and fainting when a patient stands up too quickly.",
        ],
        "antibiotics": [
            "Antibiotics treat bacterial infections but have no effect on viruses such as the common cold.",
            "Finishing the prescribed course of antibiotics helps ensure the infection is fully cleared.",
            "Overuse of antibiotics drives antimicrobial resistance, making some infections difficult to treat.",
            "Penicillin was one of the first antibiotics and is still used against streptococcal throat infections.",
            "A culture and sensitivity test identifies the bacteria and shows which antibiotics will work against them.",
            "Broad-spectrum antibiotics act on many types of bacteria and are often started before culture results return.",
            "Patients allergic to penicillin may develop a rash, swelling, or in rare cases anaphylaxis.",
            "Hand hygiene is one of the most effective ways to prevent infections from spreading in hospitals.",
            "Sepsis is a life-threatening response to infection that requires rapid antibiotics and intravenous fluids.",
            "Urinary tract infections are common and usually respond to a short course of oral antibiotics.",
            "Antibiotics can disturb the normal gut flora and sometimes cause diarrhea.",
        ],
        "surgery": [
            "Before surgery, patients usually fast for several hours to reduce the risk of aspiration under anesthesia.",
            "General anesthesia renders the patient unconscious, while local anesthesia numbs only the area being operated on.",
            "Laparoscopic surgery uses small incisions and a camera, which shortens the recovery time.",
            "Surgeons scrub their hands and wear sterile gowns to keep the operating field free of bacteria.",
            "Before an operation, the surgeon explains the risks and benefits so the patient can give informed consent.",
            "After the operation, patients are monitored in a recovery ward until the anesthetic wears off.",
            "Wound infections, bleeding, and blood clots are among the most common complications after surgery.",
            "Walking soon after an operation helps prevent deep vein thrombosis in the legs.",
            "An appendectomy is one of the most frequently performed emergency operations.",
            "Sutures or staples close the surgical incision, and they are removed once the wound has healed.",
            "Robotic systems allow surgeons to perform delicate procedures with greater precision.",
            "A surgical safety checklist confirms the patient's identity, the procedure, and the operating site before the first incision.",
        ],
        "dosage": [
            "The correct dose of a medication depends on factors such as age, body weight, and kidney function.",
            "Children's doses are often calculated in milligrams per kilogram of body weight.",
            "Taking more than the recommended dose of paracetamol can cause serious liver damage.",
            "Some tablets should be taken with food to reduce irritation of the stomach lining.",
            "The half-life of a drug determines how often it needs to be taken to maintain steady levels in the blood.",
            "Drug interactions can make a medicine stronger or weaker, so pharmacists review every prescription.",
            "Warfarin doses are adjusted according to regular blood tests that measure clotting time.",
            "Extended-release capsules should be swallowed whole rather than crushed or chewed.",
            "Elderly patients may need lower doses because they clear many drugs from the body more slowly.",
            "A loading dose quickly raises the drug level in the blood before smaller maintenance doses are given.",
            "A missed dose of a medicine should be handled as the patient leaflet advises, not by doubling the next dose.",
            "Insulin doses for people with diabetes are matched to their blood glucose readings and meals.",
        ],
        "chronic_disease": [
            "Type 1 diabetes results from the immune system destroying the insulin-producing cells of the pancreas.",
            "Type 2 diabetes is linked to insulin resistance and can often be managed with diet, exercise, and oral medication.",
            "The HbA1c test reflects average blood sugar levels over the previous two to three months.",
            "Asthma causes inflammation and narrowing of the airways, leading to wheezing and breathlessness.",
            "Inhaled corticosteroids reduce airway inflammation and help prevent asthma attacks.",
            "Chronic kidney disease is often caused by long-standing diabetes or high blood pressure.",
            "Regular foot checks help people with diabetes catch ulcers and nerve damage early.",
            "Rheumatoid arthritis is an autoimmune disease that causes painful, swollen joints.",
            "Chronic obstructive pulmonary disease is most often caused by years of smoking.",
            "Patients with long-term conditions benefit from care plans agreed with their doctor and nurse.",
            "Thyroid hormone replacement is a daily tablet for people with an underactive thyroid gland.",
        ],
    },
}

DOMAINS = ["cooking", "astronomy", "football", "law", "programming", "medicine"]


def word_count(text: str) -> int:
    return len(text.split())


def check_banks() -> None:
    """Sanity-check the sentence banks before generating anything."""
    assert list(BANKS) == DOMAINS, list(BANKS)
    seen: set[str] = set()
    for domain, topics in BANKS.items():
        sentences = [s for group in topics.values() for s in group]
        assert len(sentences) >= MIN_BANK_SIZE, (domain, len(sentences))
        for s in sentences:
            assert s.isascii(), s
            assert s == s.strip() and s[-1] in ".?!", s
            assert s not in seen, f"duplicate sentence: {s}"
            seen.add(s)
        for name, group in topics.items():
            assert len(group) >= MAX_SENTENCES, (domain, name, len(group))


def make_document(rng: random.Random, topics: dict[str, list[str]], primary: str) -> str:
    """Compose one document, mostly from `primary`, maybe also one other subtopic."""
    names = list(topics)
    # Target length: mostly 60-140 words, occasionally shorter or longer.
    target = int(rng.gauss(95, 30))
    target = max(MIN_WORDS + 5, min(MAX_WORDS - 15, target))

    secondary = None
    if target > 110 or rng.random() < 0.4:
        secondary = rng.choice([n for n in names if n != primary])

    prim_pool = rng.sample(topics[primary], len(topics[primary]))
    sec_pool = rng.sample(topics[secondary], len(topics[secondary])) if secondary else []
    share = rng.uniform(0.55, 0.8)  # probability of drawing from the primary subtopic

    prim_taken: list[str] = []
    sec_taken: list[str] = []
    words = 0
    while len(prim_taken) + len(sec_taken) < MAX_SENTENCES:
        n = len(prim_taken) + len(sec_taken)
        if n >= MIN_SENTENCES and words >= target:
            break
        prim_full = not prim_pool or len(prim_taken) >= MAX_FROM_PRIMARY
        use_secondary = bool(sec_pool) and (prim_full or (n > 0 and rng.random() > share))
        if use_secondary:
            s = sec_pool.pop()
            sec_taken.append(s)
        elif prim_pool and len(prim_taken) < MAX_FROM_PRIMARY:
            s = prim_pool.pop()
            prim_taken.append(s)
        else:
            break
        words += word_count(s)

    # Keep each subtopic's sentences together so the document reads coherently.
    blocks = [prim_taken, sec_taken]
    if sec_taken and rng.random() < 0.3:
        blocks.reverse()
    return " ".join(s for block in blocks for s in block)


def split_sentences(text: str) -> frozenset[str]:
    return frozenset(re.split(r"(?<=[.!?]) ", text))


def too_similar(a: frozenset[str], others: list[frozenset[str]]) -> bool:
    """True if `a` shares too large a fraction of its sentences with any other doc."""
    return any(len(a & b) / len(a | b) > MAX_OVERLAP for b in others)


def build_corpus() -> list[dict[str, str]]:
    check_banks()
    rng = random.Random(SEED)
    records: list[dict[str, str]] = []
    seen_texts: set[str] = set()
    for domain in DOMAINS:
        topics = BANKS[domain]
        names = list(topics)
        # Cycle through subtopics (in a shuffled order) so all are covered evenly.
        order = [names[i % len(names)] for i in range(DOCS_PER_DOMAIN)]
        rng.shuffle(order)
        domain_sents: list[frozenset[str]] = []
        for idx, primary in enumerate(order):
            for _attempt in range(5000):
                text = make_document(rng, topics, primary)
                n_words = word_count(text)
                if not MIN_WORDS <= n_words <= MAX_WORDS or text in seen_texts:
                    continue
                sents = split_sentences(text)
                if not too_similar(sents, domain_sents):
                    break
            else:  # pragma: no cover - would indicate a broken bank
                raise RuntimeError(f"could not build a valid document for {domain}")
            seen_texts.add(text)
            domain_sents.append(sents)
            records.append({"id": f"{domain}-{idx:03d}", "text": text, "domain": domain})

    rng.shuffle(records)

    # Final checks.
    assert len(records) == DOCS_PER_DOMAIN * len(DOMAINS)
    for domain in DOMAINS:
        assert sum(r["domain"] == domain for r in records) == DOCS_PER_DOMAIN, domain
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["text"] for r in records}) == len(records), "duplicate document text"
    for r in records:
        assert MIN_WORDS <= word_count(r["text"]) <= MAX_WORDS, r["id"]
        assert r["text"].isascii(), r["id"]
    return records


def main() -> None:
    records = build_corpus()
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT_PATH, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = [word_count(r["text"]) for r in records]
    print(
        f"wrote {len(records)} documents to {OUT_PATH} "
        f"(words/doc: min {min(counts)}, max {max(counts)}, "
        f"mean {sum(counts) / len(counts):.1f})"
    )


if __name__ == "__main__":
    main()
